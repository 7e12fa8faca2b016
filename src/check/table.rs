//! The limits as a table an operator reads in a terminal or a journal: markdown, padded into
//! columns, the fewest tenants in bold (ANSI bold on a terminal, `**…**` elsewhere). A row says
//! what the limit is, its value, how many tenants it allows and how that was computed.

/// How many tenants a limit allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allows {
    Tenants(u64),
    /// The limit does not grow with tenants, or there is none.
    Any,
    Unknown,
}

/// One row of the table.
#[derive(Debug)]
pub struct Limit {
    pub what: String,
    pub value: String,
    pub allows: Allows,
    pub how: String,
}

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table, with the cells allowing `fewest` tenants in bold.
pub fn render(limits: &[Limit], fewest: Option<u64>, terminal: bool) -> String {
    let header = ["limit", "value", "tenants it allows", "how"].map(String::from);
    let rows: Vec<([String; 4], bool)> = limits
        .iter()
        .map(|l| {
            let bold = matches!(l.allows, Allows::Tenants(n) if Some(n) == fewest);
            let allows = match l.allows {
                Allows::Tenants(n) if bold && !terminal => format!("**{}**", count(n)),
                Allows::Tenants(n) => count(n),
                Allows::Any => "any".into(),
                Allows::Unknown => "?".into(),
            };
            let cells = [l.what.clone(), l.value.clone(), allows, l.how.clone()];
            (cells, bold && terminal)
        })
        .collect();
    let width = |column: usize| {
        rows.iter()
            .map(|(cells, _)| &cells[column])
            .chain([&header[column]])
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let line = |cells: &[String; 4], bold: bool| {
        let mut out = String::from("|");
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths.get(i).map_or(0, |w| w - cell.chars().count());
            let text = match (bold, i) {
                (true, 2) => format!("\x1b[1m{cell}\x1b[0m"),
                _ => cell.clone(),
            };
            out.push_str(&format!(" {text}{} |", " ".repeat(pad)));
        }
        out.push('\n');
        out
    };
    let mut table = line(&header, false);
    let rule = widths.map(|w| "-".repeat(w));
    table.push_str(&format!(
        "|-{}-|-{}-|-{}-|---|\n",
        rule[0], rule[1], rule[2]
    ));
    for (cells, bold) in &rows {
        table.push_str(&line(cells, *bold));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
    }

    #[test]
    fn the_fewest_are_bold_and_columns_line_up() {
        let row = |what: &str, allows| Limit {
            what: what.into(),
            value: "v".into(),
            allows,
            how: "h".into(),
        };
        let limits = [
            row("files", Allows::Tenants(4842)),
            row("maps", Allows::Tenants(12)),
        ];
        let text = render(&limits, Some(12), false);
        assert!(text.contains("| **12**"), "{text}");
        assert!(!text.contains("**4,842**"), "{text}");
        let widths: Vec<usize> = text
            .lines()
            .map(|l| l.match_indices('|').nth(3).unwrap().0)
            .collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");
        let on_terminal = render(&limits, Some(12), true);
        assert!(on_terminal.contains("\x1b[1m12\x1b[0m"), "{on_terminal}");
    }
}
