//! Where PostgreSQL's own scanner puts statement boundaries in a query
//! string, so that the classifier can refuse text that sqlparser reads
//! differently. The two disagree on a few lexical corners (a dollar-quote
//! tag with a non-letter non-ASCII character, an operator running into a
//! `--` or `/*`): there, what the server runs is not what was decided and
//! recorded. This is not a parser: it only follows the scanner's rules for
//! what hides a `;` (strings, quoted identifiers, dollar quotes, comments)
//! with `standard_conforming_strings` on, which tollgate sets for every
//! upstream session.

/// How many statements PostgreSQL finds in `sql`: runs of tokens between
/// top-level semicolons, empty ones (only whitespace and comments) not
/// counted. `None` if the text ends inside a string, quoted identifier,
/// dollar quote or comment (the server would refuse it).
pub fn statement_count(sql: &str) -> Option<usize> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut statements = 0;
    // Whether the current statement has a token yet.
    let mut open = false;
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            b'-' if next == Some(b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if next == Some(b'*') => i = skip_block_comment(bytes, i)?,
            b';' => {
                if open {
                    statements += 1;
                    open = false;
                }
                i += 1;
            }
            _ => {
                open = true;
                i = skip_token(bytes, i)?;
            }
        }
    }
    if open {
        statements += 1;
    }
    Some(statements)
}

/// Past the comment starting at `start` (`/*`); comments nest.
fn skip_block_comment(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_dollar_tag_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

const OPERATOR_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";

/// Past the token starting at `i`, which is not whitespace, a comment or a
/// semicolon.
fn skip_token(bytes: &[u8], i: usize) -> Option<usize> {
    let b = bytes[i];
    let at = |k: usize| bytes.get(i + k).copied();
    match b {
        b'\'' => skip_quoted(bytes, i + 1, b'\'', false),
        b'"' => skip_quoted(bytes, i + 1, b'"', false),
        b'e' | b'E' if at(1) == Some(b'\'') => skip_quoted(bytes, i + 2, b'\'', true),
        b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if at(1) == Some(b'\'') => {
            skip_quoted(bytes, i + 2, b'\'', false)
        }
        b'u' | b'U' if at(1) == Some(b'&') && matches!(at(2), Some(b'\'') | Some(b'"')) => {
            skip_quoted(bytes, i + 3, bytes[i + 2], false)
        }
        b'$' => skip_dollar(bytes, i),
        _ if is_ident_start(b) => {
            let mut j = i + 1;
            while j < bytes.len() && is_ident_cont(bytes[j]) {
                j += 1;
            }
            Some(j)
        }
        _ if OPERATOR_CHARS.contains(&b) => {
            // The longest run of operator characters, cut where a comment
            // starts inside it, as PostgreSQL's scanner does.
            let mut j = i + 1;
            while j < bytes.len() && OPERATOR_CHARS.contains(&bytes[j]) {
                if matches!((bytes[j - 1], bytes[j]), (b'-', b'-') | (b'/', b'*')) {
                    return Some(j - 1);
                }
                j += 1;
            }
            Some(j)
        }
        _ => Some(i + 1),
    }
}

/// Past a quoted string or identifier whose body starts at `i`; a doubled
/// quote is a quote, and in an escape string a backslash takes the next
/// byte with it.
fn skip_quoted(bytes: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> Option<usize> {
    while i < bytes.len() {
        let b = bytes[i];
        if backslash_escapes && b == b'\\' {
            i += 2;
        } else if b == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Past a `$` token: a dollar-quoted string (`$tag$ ... $tag$`, a tag of
/// letters, digits, `_` and any non-ASCII byte, not starting with a digit),
/// a parameter (`$1`), or a lone `$` when neither follows.
fn skip_dollar(bytes: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if bytes.get(j).is_some_and(|b| b.is_ascii_digit()) {
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        return Some(j);
    }
    if bytes.get(j).is_some_and(|&b| is_ident_start(b)) {
        while j < bytes.len() && is_dollar_tag_cont(bytes[j]) {
            j += 1;
        }
    }
    if bytes.get(j) != Some(&b'$') {
        // Not a delimiter: PostgreSQL scans the `$` alone.
        return Some(i + 1);
    }
    let delimiter = &bytes[i..=j];
    let body = j + 1;
    // Unterminated: the server refuses the text; so does the count.
    bytes[body..]
        .windows(delimiter.len())
        .position(|w| w == delimiter)
        .map(|at| body + at + delimiter.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_counted_as_postgresql_splits_them() {
        for (sql, n) in [
            ("SELECT 1", Some(1)),
            ("SELECT 1;", Some(1)),
            ("SELECT 1;; ;SELECT 2", Some(2)),
            ("-- only a comment", Some(0)),
            ("/* a /* nested */ comment; */ SELECT 1", Some(1)),
            ("SELECT ';' ; SELECT \"a;b\"", Some(2)),
            ("SELECT E'\\'; still the string' ; SELECT 2", Some(2)),
            ("SELECT 'it''s; one'", Some(1)),
            ("SELECT $fn$ ; $x$ ; $fn$; SELECT 2", Some(2)),
            ("SELECT $€$ -- $€$; DELETE FROM orders", Some(2)),
            (
                "SELECT 1 >--'\n0; DELETE FROM orders; SELECT 1 --'",
                Some(3),
            ),
            ("SELECT a$b$ FROM t; SELECT 2", Some(2)),
            ("SELECT $1; SELECT 2", Some(2)),
            ("SELECT U&'d\\0061t;a'; SELECT 2", Some(2)),
            ("SELECT 'unterminated", None),
            ("SELECT $x$ unterminated", None),
            ("/* unterminated", None),
        ] {
            assert_eq!(statement_count(sql), n, "{sql}");
        }
    }
}
