//! Name patterns in policy: `*` matches any run of characters, everything
//! else matches itself (`public.*`, `sales.order_*`, `*`).

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Pattern(String);

impl From<String> for Pattern {
    fn from(text: String) -> Self {
        Pattern(text)
    }
}

impl Pattern {
    pub fn any() -> Self {
        Pattern("*".into())
    }

    /// Whether it can name something of `parts` dot-separated parts
    /// (2 for `schema.table`, 3 for `schema.table.column`): a pattern with
    /// no `*` has exactly that many; one with a `*` may match across dots.
    pub fn has_parts(&self, parts: usize) -> bool {
        self.0.contains('*') || self.0.split('.').count() == parts
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }

    /// For a `schema.table.column` pattern: whether it can match a column
    /// of `table` (`schema.table`), that is some name `table.…`. A `*`
    /// matches dots too, so the pattern is not split into its parts:
    /// `hr.*` and `*ssn` cover every table of theirs, `public.customers*`
    /// covers `public.customers`. Saying yes where no column turns out to
    /// match only refuses or masks more; saying no lets a masked column
    /// out unmasked (in a COPY, a computed column, an error's text).
    ///
    /// A table recorded with a quoted part (a name holding `.`, `"`, `*` or
    /// `?`, quoted so that it cannot pass for another name in an allow or
    /// deny pattern) is covered by a pattern written for its raw name too,
    /// as the rows' masking matches it: covering more only masks more.
    ///
    /// The tables a statement reaches without naming them
    /// ([`super::UNKNOWN_TABLES`]: a raw server file's, say) may be any
    /// table, so every pattern covers them.
    pub fn covers_table(&self, table: &str) -> bool {
        if table == super::UNKNOWN_TABLES {
            return true;
        }
        let covers =
            |table: &str| glob_can_start_with(self.0.as_bytes(), format!("{table}.").as_bytes());
        covers(table) || (table.contains('"') && covers(&unquoted(table)))
    }
}

/// `table` with its quoting taken off: quotes dropped, doubled ones kept
/// once (`public."cust?"` is `public.cust?`).
fn unquoted(table: &str) -> String {
    let mut out = String::with_capacity(table.len());
    let mut chars = table.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.peek() == Some(&'"') => {
                chars.next();
                out.push('"');
            }
            '"' => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether some text that starts with `prefix` matches `pattern`: the
/// pattern can follow the whole prefix (whatever of the pattern is left
/// matches some rest, its `*`s matching nothing). `reachable[p]`: the
/// pattern's first `p` bytes can match the prefix read so far.
fn glob_can_start_with(pattern: &[u8], prefix: &[u8]) -> bool {
    // A `*` may match nothing: reaching it reaches what follows it too.
    let past_stars = |reachable: &mut [bool]| {
        for p in 0..pattern.len() {
            if reachable[p] && pattern[p] == b'*' {
                reachable[p + 1] = true;
            }
        }
    };
    let mut reachable = vec![false; pattern.len() + 1];
    reachable[0] = true;
    past_stars(&mut reachable);
    for &byte in prefix {
        let mut next = vec![false; pattern.len() + 1];
        for (p, &at) in pattern.iter().enumerate() {
            if !reachable[p] {
                continue;
            }
            if at == b'*' {
                next[p] = true;
            } else if at == byte {
                next[p + 1] = true;
            }
        }
        past_stars(&mut next);
        if !next.contains(&true) {
            return false;
        }
        reachable = next;
    }
    true
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with one backtrack point: linear enough for names.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn stars_match_runs() {
        let p = |s: &str| Pattern(s.into());
        assert!(p("*").matches("public.customers"));
        assert!(p("public.*").matches("public.customers"));
        assert!(!p("public.*").matches("sales.orders"));
        assert!(p("sales.order_*").matches("sales.order_lines"));
        assert!(!p("public.customers").matches("public.customers2"));
        assert!(p("*.secrets").matches("hr.secrets"));
        assert!(!p("*.secrets").matches("hr.secrets_old"));
    }

    #[test]
    fn column_patterns_cover_their_tables() {
        let p = |s: &str| Pattern(s.into());
        assert!(p("public.customers.email").covers_table("public.customers"));
        assert!(!p("public.customers.email").covers_table("public.orders"));
        assert!(p("*.*.ssn").covers_table("hr.people"));
        assert!(p("*").covers_table("hr.people"));
        // A `*` across the table's end: every column of a schema, a
        // suffix, a table name's prefix.
        assert!(p("hr.*").covers_table("hr.people"));
        assert!(!p("hr.*").covers_table("fin.ledger"));
        assert!(p("*ssn").covers_table("hr.people"));
        assert!(p("public.customers*").covers_table("public.customers"));
        assert!(p("public.customers*").covers_table("public.customers_old"));
        assert!(!p("public.customers*").covers_table("public.orders"));
        assert!(p("hr.*.ssn").covers_table("hr.people"));
        assert!(!p("hr.*.ssn").covers_table("fin.ledger"));
        assert!(p("*.people.ssn").covers_table("hr.people"));
        assert!(!p("public.customers.email").covers_table("public.customer"));
        assert!(!p("public.customers.email").covers_table("public.customers.email"));
        // A table recorded quoted (its name holds `?`, `*`, `.` or `"`) is
        // covered by a pattern written for its raw name, as its rows are.
        assert!(p("public.cust?.email").covers_table("public.\"cust?\""));
        assert!(p("public.a\"b.email").covers_table("public.\"a\"\"b\""));
        assert!(!p("public.cust?.email").covers_table("public.\"cust!\""));
        // Unknown tables may be the masked one.
        assert!(p("public.customers.email").covers_table(super::super::UNKNOWN_TABLES));
    }

    proptest::proptest! {
        /// A pattern covers a table exactly when it matches some name of
        /// a column of it: every name it matches has its table covered.
        #[test]
        fn a_pattern_that_matches_a_column_covers_its_table(
            pattern in "[ab.*]{0,8}",
            table in "[ab]{1,3}\\.[ab.]{1,3}",
            column in "[ab.]{0,3}",
        ) {
            let p = Pattern(pattern);
            if p.matches(&format!("{table}.{column}")) {
                proptest::prop_assert!(p.covers_table(&table));
            }
        }
    }
}
