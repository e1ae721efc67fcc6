//! The form an attempt's dispatch (what its `endpoints` resolved to) is stored in, apart from
//! the domain's [`Dispatch`]: `{"url", "source", "endpoint"}` per env var, the JSON the stores
//! have always written, so stored rows keep reading whatever the domain or the wire becomes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_domain::{Dispatch, DispatchSource};

use crate::{StoreError, StoreResult};

#[derive(Debug, Serialize, Deserialize)]
struct StoredDispatch {
    url: Option<String>,
    source: StoredSource,
    endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredSource {
    Endpoint,
    Fallback,
}

impl From<DispatchSource> for StoredSource {
    fn from(source: DispatchSource) -> StoredSource {
        match source {
            DispatchSource::Endpoint => StoredSource::Endpoint,
            DispatchSource::Fallback => StoredSource::Fallback,
        }
    }
}

impl From<StoredSource> for DispatchSource {
    fn from(source: StoredSource) -> DispatchSource {
        match source {
            StoredSource::Endpoint => DispatchSource::Endpoint,
            StoredSource::Fallback => DispatchSource::Fallback,
        }
    }
}

/// An attempt's dispatch, by env var, as the JSON text a store keeps.
pub fn encode_dispatches(dispatches: &BTreeMap<String, Dispatch>) -> StoreResult<String> {
    let stored: BTreeMap<&str, StoredDispatch> = dispatches
        .iter()
        .map(|(var, d)| {
            let stored = StoredDispatch {
                url: d.url.clone(),
                source: d.source.into(),
                endpoint: d.endpoint.clone(),
            };
            (var.as_str(), stored)
        })
        .collect();
    serde_json::to_string(&stored).map_err(|e| StoreError::corrupt_while("attempt endpoints", e))
}

/// A stored dispatch read back; `Corrupt` if it is not the stored form.
pub fn decode_dispatches(text: &str) -> StoreResult<BTreeMap<String, Dispatch>> {
    let stored: BTreeMap<String, StoredDispatch> = serde_json::from_str(text)
        .map_err(|e| StoreError::corrupt_while("attempt endpoints", e))?;
    Ok(stored
        .into_iter()
        .map(|(var, d)| {
            let dispatch = Dispatch {
                url: d.url,
                source: d.source.into(),
                endpoint: d.endpoint,
            };
            (var, dispatch)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row exactly as the stores wrote it before the stored form was the store's own.
    const STORED: &str = r#"{"CACHE_URL":{"url":"https://fallback","source":"fallback","endpoint":null},"LLM_URL":{"url":"http://a","source":"endpoint","endpoint":"a"}}"#;

    fn expected() -> BTreeMap<String, Dispatch> {
        [
            (
                "CACHE_URL".to_string(),
                Dispatch {
                    url: Some("https://fallback".into()),
                    source: DispatchSource::Fallback,
                    endpoint: None,
                },
            ),
            (
                "LLM_URL".to_string(),
                Dispatch {
                    url: Some("http://a".into()),
                    source: DispatchSource::Endpoint,
                    endpoint: Some("a".into()),
                },
            ),
        ]
        .into()
    }

    #[test]
    fn stored_rows_read_back_and_are_written_the_same() {
        assert_eq!(decode_dispatches(STORED).unwrap(), expected());
        assert_eq!(encode_dispatches(&expected()).unwrap(), STORED);
    }

    #[test]
    fn an_unknown_source_is_corrupt() {
        let bad = STORED.replace(r#""source":"endpoint""#, r#""source":"mirror""#);
        assert!(matches!(
            decode_dispatches(&bad),
            Err(StoreError::Corrupt(_))
        ));
    }
}
