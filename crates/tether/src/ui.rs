//! How the client commands write for a person: ages and durations, commands quoted as a shell
//! would, aligned columns cut to the terminal's width, and colour only on a terminal and never
//! with `NO_COLOR` set (<https://no-color.org>).

use std::io::IsTerminal;

/// Whether stdout gets colour: a terminal, and `NO_COLOR` unset or empty.
pub fn colour_on_stdout() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The width lines are cut to: `COLUMNS` when set, else the terminal's; `None` (no cut) when
/// stdout is not a terminal, so a pipe gets whole lines.
pub fn stdout_width() -> Option<usize> {
    if let Some(cols) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
    {
        return Some(cols);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    console::Term::stdout()
        .size_checked()
        .map(|(_, cols)| usize::from(cols))
}

/// One argument as a POSIX shell reads it back: bare when it is only safe characters, else in
/// single quotes (a `'` inside becomes `'\''`).
fn quote_word(word: &str) -> String {
    let safe = !word.is_empty()
        && word.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@' | '%')
        });
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line as one would type it: `sh -c 'echo out; exit 3'`.
pub fn shell_quote(command: &[String]) -> String {
    command
        .iter()
        .map(|w| quote_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A span of seconds for a person: `0.4 s`, `9.5 s`, `42 s`, `3 m 20 s`, `2 h 5 m`, `3 d 4 h`.
pub fn span(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        let whole = s as u64;
        format!("{} m {} s", whole / 60, whole % 60)
    } else if s < 86_400.0 {
        let whole = s as u64;
        format!("{} h {} m", whole / 3600, (whole % 3600) / 60)
    } else {
        let whole = s as u64;
        format!("{} d {} h", whole / 86_400, (whole % 86_400) / 3600)
    }
}

/// `9.5 s ago`.
pub fn ago(seconds: f64) -> String {
    format!("{} ago", span(seconds))
}

/// Seconds since the epoch of an RFC 3339 stamp as the API writes it.
pub fn epoch_s(stamp: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(stamp))
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// Seconds from `from` to `to` (both RFC 3339), when both parse.
pub fn between(from: &str, to: &str) -> Option<f64> {
    Some(epoch_s(to)? - epoch_s(from)?)
}

/// Seconds since the epoch now, by this machine's clock.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A colour for a cell, written as SGR codes only when colour is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Plain,
    Green,
    Red,
    Yellow,
    Blue,
    Dim,
}

impl Colour {
    fn code(self) -> Option<&'static str> {
        match self {
            Colour::Plain => None,
            Colour::Green => Some("32"),
            Colour::Red => Some("31"),
            Colour::Yellow => Some("33"),
            Colour::Blue => Some("34"),
            Colour::Dim => Some("2"),
        }
    }
}

/// One cell of a table.
#[derive(Debug, Clone)]
pub struct Cell {
    pub text: String,
    pub colour: Colour,
}

impl Cell {
    pub fn new(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            colour: Colour::Plain,
        }
    }

    pub fn coloured(text: impl Into<String>, colour: Colour) -> Cell {
        Cell {
            text: text.into(),
            colour,
        }
    }
}

/// A table printed with its columns aligned to their widest cell; the last column is cut to
/// the width with `…` when the line would not fit.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    /// Columns aligned right (numbers, ages).
    right: Vec<bool>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// `header` names the columns; a name starting with `>` is right-aligned (the `>` is not
    /// printed).
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header
                .iter()
                .map(|h| h.trim_start_matches('>').to_string())
                .collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The lines, each cut to `width` when given; colour codes only with `colour`.
    pub fn render(&self, width: Option<usize>, colour: bool) -> Vec<String> {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.text.chars().count());
            }
        }
        let header: Vec<Cell> = self
            .header
            .iter()
            .map(|h| Cell::coloured(h.clone(), Colour::Dim))
            .collect();
        std::iter::once(&header)
            .chain(self.rows.iter())
            .map(|row| self.line(row, &widths, width, colour))
            .collect()
    }

    fn line(&self, row: &[Cell], widths: &[usize], width: Option<usize>, colour: bool) -> String {
        let mut plain_len = 0usize;
        let mut plain = String::new();
        let mut out = String::new();
        let last = widths.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            let sep = if i == 0 { "" } else { "  " };
            let mut text = if i == last {
                cell.text.clone()
            } else if self.right[i] {
                format!("{:>w$}", cell.text, w = widths[i])
            } else {
                format!("{:<w$}", cell.text, w = widths[i])
            };
            if i == last {
                if let Some(max) = width {
                    let room = max.saturating_sub(plain_len + sep.len());
                    text = cut(&text, room);
                }
            }
            plain_len += sep.len() + text.chars().count();
            plain.push_str(sep);
            plain.push_str(&text);
            out.push_str(sep);
            match cell.colour.code().filter(|_| colour) {
                Some(code) => out.push_str(&format!("\x1b[{code}m{text}\x1b[0m")),
                None => out.push_str(&text),
            }
        }
        // Narrower than the columns before the last: cut the whole line, plain.
        if let Some(max) = width.filter(|max| plain.trim_end().chars().count() > *max) {
            return cut(plain.trim_end(), max);
        }
        out.trim_end().to_string()
    }

    pub fn print(&self) {
        for line in self.render(stdout_width(), colour_on_stdout()) {
            println!("{line}");
        }
    }
}

/// `text` cut to `room` characters, the last being `…` when something was cut.
pub fn cut(text: &str, room: usize) -> String {
    if text.chars().count() <= room {
        return text.to_string();
    }
    if room == 0 {
        return String::new();
    }
    let mut out: String = text.chars().take(room - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_as_a_shell_reads_them() {
        let cmd = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shell_quote(&cmd(&["sh", "-c", "echo out; exit 3"])),
            "sh -c 'echo out; exit 3'"
        );
        assert_eq!(shell_quote(&cmd(&["echo", "it's"])), r"echo 'it'\''s'");
        assert_eq!(shell_quote(&cmd(&["make", "-j4", ""])), "make -j4 ''");
    }

    #[test]
    fn spans_read_as_a_person_says_them() {
        assert_eq!(ago(9.54), "9.5 s ago");
        assert_eq!(span(42.2), "42 s");
        assert_eq!(span(200.0), "3 m 20 s");
        assert_eq!(span(7500.0), "2 h 5 m");
        assert_eq!(span(-1.0), "0.0 s");
    }

    #[test]
    fn stamps_parse_with_and_without_fractions() {
        let a = epoch_s("2026-01-01T00:00:00Z").unwrap();
        let b = epoch_s("2026-01-01T00:00:01.500Z").unwrap();
        assert!((b - a - 1.5).abs() < 1e-6);
        assert_eq!(
            between("2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"),
            Some(60.0)
        );
    }

    #[test]
    fn tables_align_and_cut_the_last_column() {
        let mut t = Table::new(&["ID", ">AGE", "COMMAND"]);
        t.row(vec![
            Cell::new("a"),
            Cell::new("1 s"),
            Cell::new("echo hello world"),
        ]);
        t.row(vec![
            Cell::coloured("bbb", Colour::Red),
            Cell::new("10 m 2 s"),
            Cell::new("x"),
        ]);
        let lines = t.render(Some(24), false);
        assert_eq!(lines[0], "ID        AGE  COMMAND");
        assert_eq!(lines[1], "a         1 s  echo hel…");
        assert_eq!(lines[1].chars().count(), 24);
        assert_eq!(lines[2], "bbb  10 m 2 s  x");
        let coloured = t.render(None, true);
        assert!(coloured[2].starts_with("\x1b[31mbbb\x1b[0m"));
        assert!(!t.render(None, false).concat().contains('\x1b'));
        assert_eq!(t.render(Some(6), true)[2], "bbb  …");
    }
}
