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
    /// of `table` (`schema.table`).
    pub fn covers_table(&self, table: &str) -> bool {
        match self.0.rsplit_once('.') {
            Some((table_part, _)) => glob(table_part.as_bytes(), table.as_bytes()),
            None => glob(self.0.as_bytes(), table.as_bytes()) || self.0 == "*",
        }
    }
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
    }
}
