//! The parsers, binding and `matches`, without a database (the property
//! test against PostgreSQL is `tests/db/shape_filter.rs`).

use serde_json::json;

use super::*;

fn cmp(column: &str, op: CompareOp, value: Literal) -> Filter {
    Filter::Compare { column: column.into(), op, value }
}

fn text(s: &str) -> Literal {
    Literal::Text(s.into())
}

const COLUMNS: [(&str, &str); 7] = [
    ("status", "text"),
    ("qty", "integer"),
    ("note", "character varying(20)"),
    ("price", "numeric(12,2)"),
    ("ok", "boolean"),
    ("w", "double precision"),
    ("Big", "bigint"),
];

fn bound(text: &str) -> BoundFilter {
    Filter::parse(text).unwrap().bind(&COLUMNS).unwrap()
}

#[test]
fn reads_the_text_form() {
    let f = Filter::parse("status = 'paid' AND (qty >= 2 or note IS NULL)").unwrap();
    let want = Filter::And(vec![
        cmp("status", CompareOp::Eq, text("paid")),
        Filter::Or(vec![
            cmp("qty", CompareOp::Ge, Literal::Number("2".into())),
            Filter::IsNull { column: "note".into(), negated: false },
        ]),
    ]);
    assert_eq!(f, want);
    assert_eq!(f.to_string(), "(status = 'paid' and (qty >= 2 or note is null))");
    let f = Filter::parse(r#"not "Big" not in (1, -2.5e3) or x not like 'it''s\%' and y is not null and z != true"#);
    assert_eq!(
        f.unwrap().to_string(),
        r#"(not not "Big" in (1, -2.5e3) or (not x like 'it''s\%' and y is not null and z <> true))"#
    );
    assert_eq!(Filter::parse("Qty<>.5").unwrap(), cmp("qty", CompareOp::Ne, Literal::Number(".5".into())));
}

#[test]
fn the_text_form_reads_back_what_it_wrote() {
    for text in ["a = 1", r#"("and" = 'x''y' or "A b" in ('é', '')) and not (c is null)"#, "not not a like '%'"] {
        let f = Filter::parse(text).unwrap();
        assert_eq!(Filter::parse(&f.to_string()).unwrap(), f, "{text}");
    }
}

#[test]
fn syntax_errors_say_where_and_what_was_expected() {
    for (bad, position, expected) in [
        ("", 0, "a column, `not` or `(`"),
        ("status", 6, "an operator (=, <>, <, <=, >, >=), `in`, `is` or `like`"),
        ("status = ", 9, "a value: 'string', number, true or false"),
        ("status = null", 9, "use `is null`"),
        ("status = 'paid' qty", 16, "`and`, `or` or the end"),
        ("(a = 1", 6, "`and`, `or` or `)`"),
        ("a = 1)", 5, "`and`, `or` or the end"),
        ("a in 1", 5, "`(`"),
        ("a in (1 2)", 8, "`,` or `)`"),
        ("a in ()", 6, "a value"),
        ("a is 1", 5, "`null` or `not null`"),
        ("a like 1", 7, "a quoted pattern"),
        ("a not = 1", 6, "`in` or `like`"),
        ("a = 'open", 9, "a closing `'`"),
        ("\"a = 1", 6, "a closing `\"`"),
        ("a = 1x", 4, "a number"),
        ("a = -", 4, "a number"),
        ("a ! 1", 2, "an operator"),
        ("a = 1 and", 9, "a column"),
        ("a ; b", 2, "a column, a value"),
        ("and = 1", 0, "a column"),
    ] {
        match Filter::parse(bad) {
            Err(FilterError::Syntax { position: p, expected: e, .. }) => {
                assert_eq!(p, position, "{bad:?}: {e}");
                assert!(e.contains(expected), "{bad:?}: {e}");
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let message = Filter::parse("status = ").unwrap_err().to_string();
    assert_eq!(
        message,
        "filter syntax error at byte 9: expected a value: 'string', number, true or false, found the end of the filter"
    );
}

#[test]
fn depth_and_size_are_bounded() {
    let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
    assert!(Filter::parse(&nested(MAX_DEPTH)).is_ok());
    assert_eq!(Filter::parse(&nested(MAX_DEPTH + 1)), Err(FilterError::TooDeep));
    assert_eq!(Filter::parse(&nested(20_000)), Err(FilterError::TooDeep));
    assert_eq!(Filter::parse(&format!("{}a = 1", "not ".repeat(10_000))), Err(FilterError::TooDeep));
    let terms = |n: usize| vec!["a = 1"; n].join(" or ");
    assert!(Filter::parse(&terms(MAX_TERMS)).is_ok());
    assert_eq!(Filter::parse(&terms(MAX_TERMS + 1)), Err(FilterError::TooLarge("256 predicates")));
    let list = |n: usize| format!("a in ({})", vec!["1"; n].join(","));
    assert!(Filter::parse(&list(MAX_VALUES)).is_ok());
    assert_eq!(Filter::parse(&list(MAX_VALUES + 1)), Err(FilterError::TooLarge("1024 values")));
    assert_eq!(Filter::parse(&"x".repeat(MAX_BYTES + 1)), Err(FilterError::TooLarge("65536 bytes")));
    let json = |n: usize| format!("{}{{\"col\":\"a\",\"op\":\"is null\"}}{}", "{\"not\":".repeat(n), "}".repeat(n));
    assert!(Filter::from_json(&json(MAX_DEPTH)).is_ok());
    assert_eq!(Filter::from_json(&json(MAX_DEPTH + 1)), Err(FilterError::TooDeep));
    assert_eq!(Filter::from_json(&json(7000)), Err(FilterError::TooDeep));
    // Built in code past the bounds: bind refuses it, without recursing.
    let mut deep = cmp("qty", CompareOp::Eq, Literal::Number("1".into()));
    for _ in 0..100_000 {
        deep = Filter::Not(Box::new(deep));
    }
    assert_eq!(deep.bind(&COLUMNS), Err(FilterError::TooDeep));
    std::mem::forget(deep); // dropping 100,000 nested boxes recurses as deep
}

#[test]
fn reads_the_json_form() {
    let f = Filter::from_json(
        r#"{"and": [{"col": "status", "op": "=", "value": "paid"},
                    {"or": [{"col": "qty", "op": ">=", "value": 2}, {"col": "note", "op": "is null"}]},
                    {"not": {"col": "price", "op": "in", "value": [1.10, "2"]}},
                    {"col": "note", "op": "not like", "value": "a%"}]}"#,
    )
    .unwrap();
    assert_eq!(
        f.to_string(),
        "(status = 'paid' and (qty >= 2 or note is null) and not price in (1.10, '2') and not note like 'a%')"
    );
    assert_eq!(
        Filter::from_json(r#"{"col": "price", "op": "=", "value": 12345678901234567890.123456789}"#).unwrap(),
        cmp("price", CompareOp::Eq, Literal::Number("12345678901234567890.123456789".into()))
    );
}

#[test]
fn json_errors_name_the_path() {
    for (bad, found) in [
        ("[1]", "[1] at $"),
        (r#"{"and": []}"#, "at $.and"),
        (r#"{"and": [{"col": "a"}]}"#, "nothing at $.and[0].op"),
        (r#"{"col": "a", "op": "~", "value": 1}"#, "at $.op"),
        (r#"{"col": "a", "op": "=", "value": null}"#, "null at $.value"),
        (r#"{"col": "a", "op": "=", "value": [1]}"#, "[1] at $.value"),
        (r#"{"col": "a", "op": "in", "value": 1}"#, "1 at $.value"),
        (r#"{"col": "a", "op": "is null", "value": 1}"#, "1 at $.value"),
        (r#"{"col": "a", "op": "=", "value": 1, "x": 2}"#, "2 at $.x"),
        (r#"{"not": {"or": [1]}}"#, "1 at $.not.or[0]"),
    ] {
        match Filter::from_json(bad) {
            Err(FilterError::Syntax { found: f, .. }) => assert!(f.contains(found), "{bad}: {f}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(matches!(Filter::from_json("{"), Err(FilterError::Syntax { .. })));
    assert!(matches!(Filter::from_json(&"[".repeat(60_000)), Err(FilterError::Syntax { .. })));
    assert!(matches!(Filter::from_json(&"{\"not\":".repeat(8_000)), Err(FilterError::Syntax { .. })));
}

#[test]
fn binding_checks_columns_types_and_values() {
    let err = |text: &str| Filter::parse(text).unwrap().bind(&COLUMNS).unwrap_err().to_string();
    assert_eq!(err("nope = 1"), "unknown column \"nope\"");
    assert_eq!(err("big = 1"), "unknown column \"big\"", "bare names fold to lower case");
    assert!(bound(r#""Big" = '9223372036854775807'"#).matches(&json!({"Big": i64::MAX})));
    assert!(err("qty = 2147483648").contains("an integer from -2147483648 to 2147483647"));
    assert!(err("qty = 1.5").contains("1.5 is not an integer"));
    assert!(err("qty = 'x'").contains("is not a number"));
    assert!(err("status = 1").contains("write it as a string"));
    assert!(err("ok = 1").contains("is not a boolean"));
    assert!(err("qty = true").contains("compared with boolean columns only"));
    assert!(err("qty like '1%'").contains("text columns only"));
    assert!(err("note like 'a\\'").contains("must not end with the escape"));
    assert!(err("w = 1e400").contains("in the range"));
    assert!(err("status = 'a\u{0}'").contains("NUL"));
    let odd = Filter::parse("at = 1").unwrap().bind(&[("at", "uuid")]).unwrap_err();
    assert!(odd.to_string().contains("which filters do not support (supported: smallint"), "{odd}");
    assert!(Filter::parse("qty = 1").unwrap().bind(&[("qty", "int4"), ("at", "jsonb")]).is_ok());
    assert!(Filter::parse("qty = 1").unwrap().bind(&[("qty", 23u32)]).is_ok());
    assert!(Filter::parse("qty = 1").unwrap().bind(&[("qty", tokio_postgres::types::Type::INT2)]).is_ok());
    let by_oid = Filter::parse("qty = 1").unwrap().bind(&[("qty", 2950u32)]).unwrap_err();
    assert!(by_oid.to_string().contains("has type OID 2950"), "{by_oid}");
    let times = [("at", "timestamp(3) with time zone"), ("day", "date"), ("local", "timestamp without time zone")];
    let b = Filter::parse("at >= '2024-01-02T03:04:05.5+02:00' and day < 'infinity' and local <> '2024-01-02 00:00'");
    let b = b.unwrap().bind(&times).unwrap();
    assert_eq!(b.to_sql(1).0, r#"(("at" >= $1::timestamptz) AND ("day" < $2::date) AND ("local" <> $3::timestamp))"#);
    let row = json!({"at": "2024-01-02T01:04:05.5+00:00", "day": "0044-03-15 BC", "local": "2024-01-02T00:00:01"});
    assert!(b.matches(&row));
    let err = Filter::parse("at = '2024-01-02 03:04'").unwrap().bind(&times).unwrap_err();
    assert!(err.to_string().contains("a timestamp with its offset"), "{err}");
    for ok in ["qty = '7'", "qty = 7.00", "qty = 7e0", "ok = 't'", "ok = 'off'", "w = 'NaN'", "price = '-Infinity'"] {
        assert!(Filter::parse(ok).unwrap().bind(&COLUMNS).is_ok(), "{ok}");
    }
}

#[test]
fn renders_parameters_never_text() {
    let (sql, params) = bound(r#"not "Big" in (1, 2) and price > '0.10' and note like '%x' and ok and w <= 0"#.replace(" and ok", " and ok = true").as_str()).to_sql(3);
    assert_eq!(
        sql,
        r#"((NOT ("Big" IN ($3::int8, $4::int8))) AND ("price" > $5::text::numeric) AND ("note" LIKE $6::text COLLATE "C") AND ("ok" = $7::bool) AND ("w" <= $8::float8))"#
    );
    assert_eq!(params.len(), 6);
    let (sql, _) = Filter::parse(r#""we""ird" is null"#).unwrap().bind(&[("we\"ird", "text")]).unwrap().to_sql(1);
    assert_eq!(sql, r#"("we""ird" IS NULL)"#);
}

#[test]
fn matches_only_when_true_in_three_valued_logic() {
    let row = json!({"status": "paid", "qty": null, "note": "a_b%", "price": 1.10, "ok": false, "w": "NaN"});
    for (filter, want) in [
        ("status = 'paid'", true),
        ("qty = 1", false),
        ("not qty = 1", false),               // not unknown is unknown
        ("qty = 1 or status = 'paid'", true), // unknown or true
        ("qty = 1 and status = 'x'", false),
        ("not (qty = 1 and status = 'x')", true), // unknown and false is false
        ("qty in (1, 2)", false),
        ("not qty in (1, 2)", false),
        ("qty is null and note is not null", true),
        ("note like 'a\\_b\\%'", true),
        ("note like 'a__%'", true),
        ("note like 'A%'", false),
        ("price = 1.1 and price < '1.100000000000000000001'", true),
        ("ok < true and ok = 'f'", true),
        ("w = 'NaN' and w > 1e308 and w >= 'Infinity'", true),
        ("missing_is_null is null", true),
    ] {
        let columns: Vec<(&str, &str)> = COLUMNS.iter().copied().chain([("missing_is_null", "int8")]).collect();
        let b = Filter::parse(filter).unwrap().bind(&columns).unwrap();
        assert_eq!(b.matches(&row), want, "{filter}");
        assert_eq!(b.matches_json(&row.to_string()).unwrap(), want, "{filter} (json)");
    }
    assert!(!bound("qty is null").matches(&json!([1])));
    assert!(bound("qty is null").matches_json("[1]").is_err());
    // Beyond f64: exact from the row's text only.
    let b = bound("price > 12345678901234567890.1");
    assert!(b.matches_json(r#"{"price": 12345678901234567890.2}"#).unwrap());
}

#[test]
fn like_is_postgres_like() {
    for (text, pattern, want) in [
        ("", "", true),
        ("", "%", true),
        ("a", "", false),
        ("abc", "a%c", true),
        ("abc", "%b%", true),
        ("abc", "_b_", true),
        ("abc", "__", false),
        ("a%c", "a\\%c", true),
        ("abc", "a\\%c", false),
        ("a\\c", "a\\\\c", true),
        ("mississippi", "%iss%ppi", true),
        ("mississippi", "%iss%ppx", false),
        ("héé", "h_é", true),
        ("aaa", "%%a%%", true),
    ] {
        assert_eq!(eval::like(text, pattern), want, "{text:?} like {pattern:?}");
    }
}
