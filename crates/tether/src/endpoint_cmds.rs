//! `tether endpoints`: each endpoint with its readiness and stamp age, and the pools with
//! what each hands out now (SPEC §5).

use clap::Args;

use crate::client_cmds::{print_json, ClientArgs};
use crate::CliError;

#[derive(Debug, Clone, Args)]
pub struct EndpointsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the JSON of `GET /v1/endpoints` instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn endpoints(args: EndpointsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let list = client.list_endpoints().await?;
    if args.json {
        print_json(&list);
        return Ok(0);
    }
    println!(
        "{:<24}  {:<16}  {:<12}  {:<5}  {:>9}  {:<32}  LAST ERROR",
        "NAME", "POOL", "KIND", "READY", "STAMP AGE", "URL"
    );
    for e in &list.endpoints {
        let age = e
            .stamp_age_s
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24}  {:<16}  {:<12}  {:<5}  {:>9}  {:<32}  {}",
            e.name,
            e.pool,
            e.kind.as_str(),
            if e.ready { "yes" } else { "no" },
            age,
            e.url,
            e.last_error.as_deref().unwrap_or("")
        );
    }
    let pools = client.list_pools().await?;
    if !pools.pools.is_empty() {
        println!();
        println!(
            "{:<16}  {:>10}  {:<9}  {:<32}  FALLBACK",
            "POOL", "FRESHNESS", "SOURCE", "DISPATCHES"
        );
        for p in &pools.pools {
            let now = match client.dispatch(&p.name).await {
                Ok(d) => format!(
                    "{} ({})",
                    d.url.unwrap_or_default(),
                    d.endpoint.unwrap_or_else(|| d.source.as_str().into())
                ),
                Err(_) => "nothing ready".into(),
            };
            println!(
                "{:<16}  {:>9}s  {:<9}  {:<32}  {}",
                p.name,
                p.freshness_s,
                p.source,
                now,
                p.fallback_url.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(0)
}
