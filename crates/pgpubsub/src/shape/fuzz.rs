//! Any text or JSON given to the parsers gives a filter or an error, never a
//! panic; a filter read back from its text form is the same filter.

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::Filter;

const COLUMNS: [(&str, &str); 4] = [("a", "integer"), ("s", "text"), ("n", "numeric"), ("t", "timestamptz")];

proptest! {
    #![proptest_config(Config { cases: 512, failure_persistence: None, ..Config::default() })]

    #[test]
    fn any_text_parses_or_errs_without_panicking(
        text in prop_oneof![any::<String>(), "[a-z0-9 ()'\"=<>!,.%_\\\\-]{0,60}", "(not |a (=|in|like|is) |'x' |\\(|\\)|and |or |null |1 |, ){0,30}"]
    ) {
        if let Ok(f) = Filter::parse(&text) {
            prop_assert_eq!(Filter::parse(&f.to_string()).unwrap(), f.clone());
            let _ = f.bind(&COLUMNS).map(|b| (b.to_sql(1).0, b.matches(&serde_json::json!({"s": "x"}))));
        }
    }

    #[test]
    fn any_json_parses_or_errs_without_panicking(
        text in prop_oneof![any::<String>(), "[\\[\\]{}:,\"a-z0-9 =<>-]{0,80}", "(\\{\"(and|or|not)\": \\[?|\\{\"col\": \"i4\", \"op\": \"(=|in|is null|like)\", \"value\": (1|\"x\"|\\[1\\]|null)\\}|\\]|\\}|, ){0,20}"]
    ) {
        if let Ok(f) = Filter::from_json(&text) {
            let _ = f.bind(&COLUMNS).map(|b| b.matches_json("{}").unwrap());
        }
    }
}
