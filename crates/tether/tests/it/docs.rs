//! The reference in `docs/` stays true: every flag and variable any `--help` shows is in
//! `docs/configuration.md`, every API path is in `docs/api.md`, and every test named in
//! `docs/guarantees.md` exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::TETHER;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join("docs").join(name))
        .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

fn help(args: &[&str]) -> String {
    let out = Command::new(TETHER)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `tether --help` lists.
fn subcommands() -> Vec<String> {
    help(&[])
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Words starting with `prefix` and made of `allowed` characters, as they appear in `text`.
fn words(text: &str, prefix: &str, allowed: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail[prefix.len()..]
            .find(|c: char| !allowed(c))
            .map(|e| e + prefix.len())
            .unwrap_or(tail.len());
        if end > prefix.len() {
            found.insert(tail[..end].trim_end_matches('-').to_string());
        }
        rest = &tail[end.max(1)..];
    }
    found
}

#[test]
fn every_flag_in_every_help_is_documented() {
    let config = doc("configuration.md");
    let commands = subcommands();
    assert!(commands.len() >= 10, "{commands:?}");
    let mut missing = Vec::new();
    for command in &commands {
        let text = help(&[command]);
        // Option lines only: `  -f, --follow  …` / `      --server <SERVER>  …`.
        let options: String = text
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .map(|l| l.split("  ").find(|p| !p.trim().is_empty()).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let flags = words(&options, "--", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        });
        let vars = words(&text, "TETHER_", |c| {
            c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
        });
        for flag in flags.iter().filter(|f| *f != "--help" && *f != "--version") {
            if !config.contains(&format!("`{flag}`")) {
                missing.push(format!("tether {command}: `{flag}`"));
            }
        }
        for var in vars {
            if !config.contains(&format!("`{var}`")) {
                missing.push(format!("tether {command}: `{var}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md (add a row to the command's table, with the flag and its \
         variable in backticks):\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_api_path_is_documented() {
    let api = doc("api.md");
    let document = tether_server::openapi::document();
    let missing: Vec<String> = document["paths"]
        .as_object()
        .expect("the OpenAPI document has paths")
        .keys()
        .filter(|path| !api.contains(&format!(" {path}`")))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "paths of the OpenAPI document not in docs/api.md (add a row `METHOD PATH`): {missing:?}"
    );
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_test_named_in_the_guarantees_exists() {
    let guarantees = doc("guarantees.md");
    let mut files = Vec::new();
    sources(&repo().join("crates"), &mut files);
    let code: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    // Test names are the backticked snake_case words of the tables' second column.
    let named: BTreeSet<String> = guarantees
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| promise") && !l.starts_with("| ---"))
        .filter_map(|l| l.rsplit(" | ").next())
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|w| {
                    w.contains('_')
                        && w.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(named.len() > 30, "{named:?}");
    let missing: Vec<&String> = named
        .iter()
        .filter(|name| !code.contains(&format!("fn {name}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/guarantees.md names tests that do not exist: {missing:?}"
    );
}
