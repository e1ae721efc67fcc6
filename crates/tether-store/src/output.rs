//! Output exactly once: what of an append is new, judged the same way by every store against
//! the offsets the attempt has stored. Pure.

use crate::{OutputChunk, OutputStream, StreamOffsets};

/// The parts of `chunks` not yet stored, in order, given that the attempt has stored `stored`
/// bytes of each stream. A chunk that names its offset is skipped where it repeats stored
/// bytes (a retry of an append whose answer was lost) and trimmed where it overlaps them; one
/// that begins past the stored end is a gap, and the whole append is refused with the offsets
/// the store expects (`Err`), so nothing after a hole is ever stored. A chunk without an offset
/// is new by definition.
pub fn new_output(
    chunks: &[OutputChunk],
    stored: StreamOffsets,
) -> Result<Vec<(OutputStream, &[u8])>, StreamOffsets> {
    let mut end = stored;
    let mut fresh = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let data = match chunk.offset {
            None => &chunk.data[..],
            Some(offset) => {
                let have = end.of(chunk.stream);
                if offset > have {
                    return Err(stored);
                }
                let repeated = usize::try_from(have - offset).unwrap_or(usize::MAX);
                chunk.data.get(repeated..).unwrap_or(&[])
            }
        };
        if !data.is_empty() {
            end.add(chunk.stream, data.len() as i64);
            fresh.push((chunk.stream, data));
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutputStream::{Stderr, Stdout};

    fn chunk(stream: OutputStream, offset: Option<i64>, data: &[u8]) -> OutputChunk {
        OutputChunk {
            stream,
            ts: 0,
            data: data.to_vec(),
            offset,
        }
    }

    fn offsets(stdout: i64, stderr: i64) -> StreamOffsets {
        StreamOffsets { stdout, stderr }
    }

    #[test]
    fn repeats_are_skipped_overlaps_trimmed_and_new_bytes_kept() {
        let chunks = [
            chunk(Stdout, Some(0), b"abc"),
            chunk(Stderr, Some(0), b"e"),
            chunk(Stdout, Some(3), b"def"),
        ];
        let got = new_output(&chunks, offsets(4, 1)).unwrap();
        assert_eq!(got, vec![(Stdout, &b"ef"[..])]);
        let got = new_output(&chunks, offsets(0, 0)).unwrap();
        assert_eq!(
            got,
            vec![
                (Stdout, &b"abc"[..]),
                (Stderr, &b"e"[..]),
                (Stdout, &b"def"[..])
            ]
        );
        assert!(new_output(&chunks, offsets(6, 1)).unwrap().is_empty());
    }

    #[test]
    fn a_gap_refuses_the_whole_append_with_what_is_expected() {
        let chunks = [chunk(Stdout, Some(0), b"ab"), chunk(Stdout, Some(5), b"x")];
        assert_eq!(new_output(&chunks, offsets(0, 7)), Err(offsets(0, 7)));
        let chunks = [chunk(Stderr, Some(1), b"x")];
        assert_eq!(new_output(&chunks, offsets(9, 0)), Err(offsets(9, 0)));
    }

    #[test]
    fn chunks_without_offsets_are_always_new() {
        let chunks = [chunk(Stdout, None, b"a"), chunk(Stdout, None, b"a")];
        assert_eq!(new_output(&chunks, offsets(100, 0)).unwrap().len(), 2);
    }
}
