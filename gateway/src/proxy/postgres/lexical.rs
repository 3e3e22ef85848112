//! Where PostgreSQL's own scanner puts statement boundaries, strings and
//! comments in a query string, so that the classifier can refuse text that
//! sqlparser reads differently. The two disagree on a few lexical corners
//! (a dollar-quote tag with a non-letter non-ASCII character, an operator
//! running into a `--` or `/*`, `?--`): there, what the server runs is not
//! what was decided and recorded. This is not a parser: it follows the
//! scanner's rules for what hides a `;` (strings, quoted identifiers,
//! dollar quotes, comments) with `standard_conforming_strings` on, which
//! tollgate sets for every upstream session, and psql's rule for the `;`
//! inside a `BEGIN ATOMIC ... END` routine body.

/// What PostgreSQL's scanner finds in a query string.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Runs of tokens between top-level semicolons, empty ones (only
    /// whitespace and comments) not counted.
    pub statements: usize,
    /// Byte offsets where a string, quoted identifier, dollar quote or
    /// comment starts: everything in them is opaque to the grammar.
    pub opaque_starts: Vec<usize>,
    /// The operators the scanner makes of the runs of operator characters
    /// (see [`operators_of_run`]), each once.
    pub operators: std::collections::BTreeSet<String>,
}

/// How many statements PostgreSQL finds in `sql` (see [`scan`]).
#[cfg(test)]
pub fn statement_count(sql: &str) -> Option<usize> {
    scan(sql).map(|scan| scan.statements)
}

/// Scans `sql` as PostgreSQL would. `None` if the text ends inside a
/// string, quoted identifier, dollar quote or comment (the server would
/// refuse it).
pub fn scan(sql: &str) -> Option<Scan> {
    let bytes = sql.as_bytes();
    let mut out = Scan::default();
    let mut i = 0;
    // Whether the current statement has a token yet.
    let mut open = false;
    // The current statement starts with CREATE: a routine body `BEGIN
    // ATOMIC ... END` may follow, in which a `;` does not end the
    // statement; inside it CASE opens a block that END closes too (psql's
    // rule, which PostgreSQL's grammar agrees with).
    let mut creates = false;
    let mut block_depth = 0usize;
    // The previous word was an unquoted BEGIN.
    let mut after_begin = false;
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            b'-' if next == Some(b'-') => {
                out.opaque_starts.push(i);
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if next == Some(b'*') => {
                out.opaque_starts.push(i);
                i = skip_block_comment(bytes, i)?;
            }
            b';' if block_depth == 0 => {
                if open {
                    out.statements += 1;
                    open = false;
                    creates = false;
                }
                i += 1;
            }
            _ => {
                let first = !open;
                open = true;
                let (end, kind) = skip_token(bytes, i)?;
                if let TokenKind::Opaque = kind {
                    out.opaque_starts.push(i);
                }
                if OPERATOR_CHARS.contains(&b) {
                    for op in operators_of_run(&bytes[i..end]) {
                        let op = String::from_utf8_lossy(op);
                        if !out.operators.contains(op.as_ref()) {
                            out.operators.insert(op.into_owned());
                        }
                    }
                }
                match kind {
                    TokenKind::Word => {
                        let word = &bytes[i..end];
                        if first {
                            creates = word.eq_ignore_ascii_case(b"create");
                        } else if creates {
                            if after_begin && word.eq_ignore_ascii_case(b"atomic")
                                || (block_depth > 0 && word.eq_ignore_ascii_case(b"case"))
                            {
                                block_depth += 1;
                            } else if block_depth > 0 && word.eq_ignore_ascii_case(b"end") {
                                block_depth -= 1;
                            }
                        }
                        after_begin = word.eq_ignore_ascii_case(b"begin");
                    }
                    TokenKind::Opaque | TokenKind::Other => after_begin = false,
                }
                i = end;
            }
        }
    }
    if open {
        out.statements += 1;
    }
    Some(out)
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

/// What kind of token [`skip_token`] passed.
enum TokenKind {
    /// A string, quoted identifier or dollar quote.
    Opaque,
    /// An unquoted identifier or keyword.
    Word,
    Other,
}

/// Past the token starting at `i`, which is not whitespace, a comment or a
/// semicolon.
fn skip_token(bytes: &[u8], i: usize) -> Option<(usize, TokenKind)> {
    let b = bytes[i];
    let at = |k: usize| bytes.get(i + k).copied();
    let opaque = |end: Option<usize>| end.map(|end| (end, TokenKind::Opaque));
    match b {
        b'\'' => opaque(skip_string(bytes, i + 1, false)),
        b'"' => opaque(skip_quoted(bytes, i + 1, b'"', false)),
        b'e' | b'E' if at(1) == Some(b'\'') => opaque(skip_string(bytes, i + 2, true)),
        b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if at(1) == Some(b'\'') => {
            opaque(skip_string(bytes, i + 2, false))
        }
        b'u' | b'U' if at(1) == Some(b'&') && at(2) == Some(b'\'') => {
            opaque(skip_string(bytes, i + 3, false))
        }
        b'u' | b'U' if at(1) == Some(b'&') && at(2) == Some(b'"') => {
            opaque(skip_quoted(bytes, i + 3, b'"', false))
        }
        b'$' => skip_dollar(bytes, i),
        _ if is_ident_start(b) => {
            let mut j = i + 1;
            while j < bytes.len() && is_ident_cont(bytes[j]) {
                j += 1;
            }
            Some((j, TokenKind::Word))
        }
        _ if OPERATOR_CHARS.contains(&b) => {
            // The longest run of operator characters, cut where a comment
            // starts inside it, as PostgreSQL's scanner does.
            let mut j = i + 1;
            while j < bytes.len() && OPERATOR_CHARS.contains(&bytes[j]) {
                if matches!((bytes[j - 1], bytes[j]), (b'-', b'-') | (b'/', b'*')) {
                    return Some((j - 1, TokenKind::Other));
                }
                j += 1;
            }
            Some((j, TokenKind::Other))
        }
        _ => Some((i + 1, TokenKind::Other)),
    }
}

/// Past a string literal whose body starts at `i`, and past the parts
/// that continue it: PostgreSQL joins a string with the next one when
/// only whitespace with a newline (and comments) separates them, and the
/// continuation is read as the first part is (with or without backslash
/// escapes).
fn skip_string(bytes: &[u8], i: usize, backslash_escapes: bool) -> Option<usize> {
    let mut end = skip_quoted(bytes, i, b'\'', backslash_escapes)?;
    loop {
        // PostgreSQL's rule: spaces, tabs and `--` comments, a newline,
        // then any whitespace and comments, then the next quote.
        let mut j = end;
        let mut newline = false;
        while j < bytes.len() {
            match bytes[j] {
                b'\n' | b'\r' => {
                    newline = true;
                    j += 1;
                }
                b' ' | b'\t' | 0x0c => j += 1,
                0x0b if newline => j += 1,
                b'-' if bytes.get(j + 1) == Some(&b'-') => {
                    while j < bytes.len() && bytes[j] != b'\n' && bytes[j] != b'\r' {
                        j += 1;
                    }
                }
                _ => break,
            }
        }
        if !newline || bytes.get(j) != Some(&b'\'') {
            return Some(end);
        }
        end = skip_quoted(bytes, j + 1, b'\'', backslash_escapes)?;
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
fn skip_dollar(bytes: &[u8], i: usize) -> Option<(usize, TokenKind)> {
    let mut j = i + 1;
    if bytes.get(j).is_some_and(|b| b.is_ascii_digit()) {
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        return Some((j, TokenKind::Other));
    }
    if bytes.get(j).is_some_and(|&b| is_ident_start(b)) {
        while j < bytes.len() && is_dollar_tag_cont(bytes[j]) {
            j += 1;
        }
    }
    if bytes.get(j) != Some(&b'$') {
        // Not a delimiter: PostgreSQL scans the `$` alone.
        return Some((i + 1, TokenKind::Other));
    }
    let delimiter = &bytes[i..=j];
    let body = j + 1;
    // Unterminated: the server refuses the text; so does the scan.
    bytes[body..]
        .windows(delimiter.len())
        .position(|w| w == delimiter)
        .map(|at| (body + at + delimiter.len(), TokenKind::Opaque))
}

/// The operators PostgreSQL's scanner makes of one run of operator
/// characters (already cut where a comment starts): a multi-character
/// operator may not end in `+` or `-` unless it holds one of
/// ``~!@#^&|`?%``, so `=-` is `=` then `-`, while `@-` and `||-` are
/// operators of their own; what is cut off is scanned again.
pub fn operators_of_run(mut run: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if run.is_empty() {
            return None;
        }
        let mut len = run.len();
        if len > 1
            && matches!(run[len - 1], b'+' | b'-')
            && !run[..len - 1].iter().any(|b| b"~!@#^&|`?%".contains(b))
        {
            while len > 1 && matches!(run[len - 1], b'+' | b'-') {
                len -= 1;
            }
        }
        let (op, rest) = run.split_at(len);
        run = rest;
        Some(op)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operators of a text are PostgreSQL's: trailing signs split off
    /// only where the scanner splits them, nothing inside strings or
    /// comments.
    #[test]
    fn operators_are_split_as_postgresql_splits_them() {
        let scan =
            scan("SELECT a =- 1, b ||- c, d >=-+1, e @- f, g <> h -- x ~~~\n /* <=> */ 'a ~~~ b'")
                .expect("scans");
        let ops: Vec<&str> = scan.operators.iter().map(String::as_str).collect();
        assert_eq!(ops, ["+", "-", "<>", "=", ">=", "@-", "||-"]);
        let split = |run: &str| -> Vec<String> {
            operators_of_run(run.as_bytes())
                .map(|op| String::from_utf8_lossy(op).into_owned())
                .collect()
        };
        assert_eq!(split("=-+"), ["=", "-", "+"]);
        assert_eq!(split("?-"), ["?-"]);
        assert_eq!(split("*-"), ["*", "-"]);
        assert_eq!(split("==="), ["==="]);
    }

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
            // A continued string keeps its first part's escapes.
            ("SELECT E'a'\n'\\'; SELECT 1; --'", Some(1)),
            ("SELECT 'a' 'b'; SELECT 2", Some(2)),
            ("SELECT E'a' -- c\n'\\'; SELECT 1; --'", Some(1)),
            // psql's rule for routine bodies.
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END; SELECT 3",
                Some(2),
            ),
            ("BEGIN; SELECT 1 AS \"end\"; END", Some(3)),
            ("CREATE TEMP TABLE begin (a int); END; SELECT 2", Some(3)),
            ("CREATE TABLE x (begin date); SELECT 1", Some(2)),
        ] {
            assert_eq!(statement_count(sql), n, "{sql}");
        }
    }

    #[test]
    fn strings_and_comments_are_located() {
        let sql = "SELECT 'a', E'b', \"c\", $$d$$, U&'e' -- f\n/* g */ ?--h";
        let starts = scan(sql).unwrap().opaque_starts;
        let at = |needle: &str| sql.find(needle).unwrap();
        assert_eq!(
            starts,
            vec![
                at("'a'"),
                at("E'b'"),
                at("\"c\""),
                at("$$d"),
                at("U&'e'"),
                at("-- f"),
                at("/* g"),
                at("--h"),
            ]
        );
    }
}
