//! Property tests over everything that reads agent or server bytes: the
//! frame cutter and every message decoder, the startup reader, masking, and
//! the SQL classifier. Arbitrary input must give an answer or an error,
//! never a panic. CI runs a fixed budget (PROPTEST_CASES, default below);
//! raise it locally for a longer hunt.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use super::{classify::classify, mask, wire};

fn config() -> ProptestConfig {
    crate::proptest_config(4096)
}

/// A frame with an arbitrary tag and body but a consistent length, so the
/// decoders (not only the cutter) see arbitrary content.
fn framed(tag: u8, body: &[u8]) -> wire::Frame {
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(body);
    wire::split_frame(&mut out)
        .expect("well-formed header")
        .expect("complete")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_frame_cutter_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(frame)) = wire::split_frame(&mut buf) {
            prop_assert!(frame.bytes.len() >= 5);
        }
    }

    #[test]
    fn message_decoders_never_panic(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256), types in proptest::collection::vec(any::<u32>(), 0..4)) {
        let frame = framed(tag, &body);
        let _ = wire::query_text(&frame);
        let _ = wire::parse_message(&frame);
        let _ = wire::bind_message(&frame);
        let _ = wire::bind_parameters_rendered(&frame, &types, 16, 256);
        let _ = wire::execute_portal(&frame);
        let _ = wire::close_message(&frame);
        let _ = wire::password(&frame);
        let _ = wire::command_complete_rows(&frame);
        let _ = wire::error_fields(&frame);
        let _ = wire::parameter_status(&frame, "application_name");
        if let Ok(plan) = mask::plan(&framed(b'T', &body), &mask::MaskSet::default(), true) {
            let _ = mask::apply(&framed(b'D', &body), &plan);
        }
        let _ = mask::apply(&frame, &mask::ResultMask::everything());
    }

    #[test]
    fn the_startup_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let _ = runtime.block_on(wire::read_startup(&mut &bytes[..]));
    }

    #[test]
    fn the_classifier_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = classify(&text);
    }

    #[test]
    fn the_classifier_never_panics_on_sql_shaped_soup(words in proptest::collection::vec(
        prop_oneof![
            Just("SELECT"), Just("FROM"), Just("WHERE"), Just("WITH"), Just("AS"), Just("("), Just(")"),
            Just("DELETE"), Just("UPDATE"), Just("SET"), Just("INSERT"), Just("INTO"), Just("VALUES"),
            Just("COPY"), Just("TO"), Just("STDOUT"), Just("PROGRAM"), Just("DROP"), Just("TABLE"),
            Just(";"), Just(","), Just("t"), Just("s.t"), Just("'x'"), Just("1"), Just("*"), Just("="),
            Just("pg_read_file"), Just("ROLE"), Just("GRANT"), Just("ON"), Just("EXPLAIN"), Just("ANALYZE"),
        ],
        0..40,
    )) {
        let _ = classify(&words.join(" "));
    }

    /// PostgreSQL's statement count (see `lexical`) over the fragments
    /// that open and close its quoted forms, in any order and unfinished:
    /// it never panics, and a text it counts still counts the same with an
    /// empty statement added.
    #[test]
    fn the_statement_count_never_panics_on_quoting_soup(parts in proptest::collection::vec(
        prop_oneof![
            Just("'"), Just("''"), Just("\""), Just("E'"), Just("e'"), Just("\\"), Just("U&'"),
            Just("U&\""), Just("$"), Just("$$"), Just("$a$"), Just("$€$"), Just("$1"), Just("a$b"),
            Just("--"), Just("\n"), Just("\r"), Just("/*"), Just("*/"), Just(";"), Just(">"),
            Just("-"), Just("/"), Just("*"), Just("SELECT"), Just(" "), Just("x"), Just("N'"),
        ],
        0..40,
    )) {
        let text = parts.concat();
        if let Some(n) = super::lexical::statement_count(&text) {
            prop_assert_eq!(super::lexical::statement_count(&format!("{text}\n;")), Some(n));
        }
    }
}
