//! The JSON Schemas of run inputs, enforced exactly as they are published.
//!
//! Invariant: the inputs of every agent, workflow and work order are checked against the very
//! schema `/openapi.json` and `GET /agents/{name}/schema` publish, by [`InputSchema::check`]:
//! a value the schema allows is accepted, a value it refuses is refused (422 naming the field),
//! and every limit (`maxLength`, `maxItems`, `minimum`, `maximum`, `pattern`, `enum`, …) lives
//! in the schema alone. The keywords understood are the ones the schemas use; a schema using
//! another fails the test that walks every published schema.
//!
//! Details keep the check identical to a JSON Schema validator's (Python's `jsonschema`, which
//! the fuzzer runs): a number written as an integer is compared exactly, any other is read as
//! the nearest float first (`1000000.00000000001` is `1000000.0`, within a maximum of
//! `1000000`; `3.0000000000000001` is the integer `3`); `integer` means a number without a
//! fractional part (`2.0` is an integer, and is stored as `2`); a number too large for a float
//! is refused; and `pattern` is searched as JSON Schema does, with `$` also matching before a
//! final line break. No schema uses `multipleOf`, which validators judge through floats with
//! answers that differ from one to the next.

use serde_json::{Map, Value};

/// Inputs that do not fit a workflow, naming the offending field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: String,
    pub message: String,
}

/// The keywords [`InputSchema::check`] understands; anything else in a published input schema
/// is a mistake (see the module invariant).
pub const KNOWN_KEYWORDS: [&str; 27] = [
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "maxProperties",
    "minProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "oneOf",
    "anyOf",
    "allOf",
    "$ref",
    // Annotations: they describe, they do not constrain.
    "description",
    "format",
    "title",
    "default",
];

/// The part of a text a `pattern` ending in `$` constrains: JSON Schema validators let `$`
/// match before a final line break, so a value that ends with one reads as the value without
/// it wherever such a pattern is the rule.
pub fn without_final_line_break(text: &str) -> &str {
    text.strip_suffix('\n').unwrap_or(text)
}

/// A schema and the named schemas its `$ref`s point at (`#/components/schemas/{name}`).
#[derive(Debug, Clone, Default)]
pub struct InputSchema {
    pub schema: Value,
    pub components: Map<String, Value>,
}

impl InputSchema {
    pub fn new(schema: Value, components: Map<String, Value>) -> Self {
        Self { schema, components }
    }

    /// The schema of a type deriving `utoipa::ToSchema`, with the schemas it refers to.
    pub fn of<T: utoipa::ToSchema>() -> Self {
        let mut referenced = Vec::new();
        T::schemas(&mut referenced);
        let components = referenced
            .into_iter()
            .map(|(name, schema)| (name, serde_json::to_value(schema).unwrap_or(Value::Null)))
            .collect();
        Self {
            schema: serde_json::to_value(T::schema()).unwrap_or(Value::Null),
            components,
        }
    }

    /// The schema as one self-contained document: its components under
    /// `components.schemas`, where its `$ref`s point.
    pub fn to_document(&self) -> Value {
        let mut document = self.schema.clone();
        if let (Value::Object(map), false) = (&mut document, self.components.is_empty()) {
            map.insert(
                "components".to_owned(),
                serde_json::json!({"schemas": self.components}),
            );
        }
        document
    }

    /// Checks `value` (the run's `inputs`) and normalises integers written with a fraction of
    /// zero. The error names the first offending field, as `inputs.a.b`.
    pub fn check(&self, value: &mut Value) -> Result<(), InputError> {
        self.check_at(&self.schema, value, "inputs", 0)
    }

    /// Every keyword used anywhere in the schema and its components (for the test that keeps
    /// them within [`KNOWN_KEYWORDS`]).
    pub fn keywords(&self) -> Vec<String> {
        fn walk(schema: &Value, found: &mut Vec<String>) {
            let Value::Object(map) = schema else { return };
            for (key, value) in map {
                if !found.contains(key) {
                    found.push(key.clone());
                }
                match key.as_str() {
                    "properties" => {
                        if let Value::Object(properties) = value {
                            properties.values().for_each(|p| walk(p, found));
                        }
                    }
                    "items" | "additionalProperties" => walk(value, found),
                    "oneOf" | "anyOf" | "allOf" => {
                        if let Value::Array(list) = value {
                            list.iter().for_each(|s| walk(s, found));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.schema, &mut found);
        self.components.values().for_each(|s| walk(s, &mut found));
        found
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        match schema.get("$ref").and_then(Value::as_str) {
            None => Ok(schema),
            Some(reference) => reference
                .strip_prefix("#/components/schemas/")
                .and_then(|name| self.components.get(name))
                .ok_or_else(|| format!("the schema refers to {reference}, which it does not have")),
        }
    }

    fn check_at(
        &self,
        schema: &Value,
        value: &mut Value,
        at: &str,
        depth: usize,
    ) -> Result<(), InputError> {
        let fail = |message: String| InputError {
            field: at.to_owned(),
            message,
        };
        if depth > 32 {
            return Err(fail("is nested too deeply".to_owned()));
        }
        let schema = self.resolve(schema).map_err(fail)?;
        let Value::Object(rules) = schema else {
            // `true` (or an empty schema) allows anything; `false` nothing.
            return if schema == &Value::Bool(false) {
                Err(fail("is not allowed".to_owned()))
            } else {
                Ok(())
            };
        };
        if let Some(types) = rules.get("type") {
            check_type(types, value).map_err(fail)?;
        }
        if let Some(Value::Array(allowed)) = rules.get("enum") {
            if !allowed.iter().any(|a| same(a, value)) {
                return Err(fail(format!(
                    "must be one of {}",
                    Value::Array(allowed.clone())
                )));
            }
        }
        if let Some(constant) = rules.get("const") {
            if !same(constant, value) {
                return Err(fail(format!("must be {constant}")));
            }
        }
        for combinator in ["allOf", "anyOf", "oneOf"] {
            if let Some(Value::Array(options)) = rules.get(combinator) {
                self.check_combinator(combinator, options, value, at, depth)?;
            }
        }
        match value {
            Value::String(text) => check_string(rules, text).map_err(fail)?,
            Value::Number(_) => check_number(rules, value).map_err(fail)?,
            Value::Array(items) => {
                let count = items.len() as u64;
                if let Some(max) = rules.get("maxItems").and_then(Value::as_u64) {
                    if count > max {
                        return Err(fail(format!("must have at most {max} items")));
                    }
                }
                if let Some(min) = rules.get("minItems").and_then(Value::as_u64) {
                    if count < min {
                        return Err(fail(format!("must have at least {min} items")));
                    }
                }
                if rules.get("uniqueItems") == Some(&Value::Bool(true)) {
                    for (i, item) in items.iter().enumerate() {
                        if items[..i].iter().any(|earlier| same(earlier, item)) {
                            return Err(fail(format!("must not repeat an item (item {i})")));
                        }
                    }
                }
                if let Some(item_schema) = rules.get("items") {
                    for (i, item) in items.iter_mut().enumerate() {
                        self.check_at(item_schema, item, &format!("{at}.{i}"), depth + 1)?;
                    }
                }
            }
            Value::Object(fields) => self.check_object(rules, fields, at, depth)?,
            Value::Null | Value::Bool(_) => {}
        }
        Ok(())
    }

    fn check_combinator(
        &self,
        combinator: &str,
        options: &[Value],
        value: &mut Value,
        at: &str,
        depth: usize,
    ) -> Result<(), InputError> {
        // Each option is tried on a copy; the one that fits normalises the value.
        let mut fitting = Vec::new();
        let mut first_error = None;
        for option in options {
            let mut candidate = value.clone();
            match self.check_at(option, &mut candidate, at, depth + 1) {
                Ok(()) => fitting.push(candidate),
                Err(error) => {
                    if combinator == "allOf" {
                        return Err(error);
                    }
                    // The option that got furthest into the value explains the refusal best.
                    let further = first_error
                        .as_ref()
                        .is_none_or(|e: &InputError| error.field.len() > e.field.len());
                    if further {
                        first_error = Some(error);
                    }
                }
            }
        }
        let fits = match combinator {
            "oneOf" => fitting.len() == 1,
            "anyOf" => !fitting.is_empty(),
            _ => true,
        };
        if !fits {
            return Err(match (combinator, fitting.len(), first_error) {
                ("oneOf", n, _) if n > 1 => InputError {
                    field: at.to_owned(),
                    message: "matches more than one of the allowed shapes".to_owned(),
                },
                (_, _, Some(error)) => error,
                _ => InputError {
                    field: at.to_owned(),
                    message: "matches none of the allowed shapes".to_owned(),
                },
            });
        }
        if let Some(normalised) = fitting.pop() {
            *value = normalised;
        }
        Ok(())
    }

    fn check_object(
        &self,
        rules: &Map<String, Value>,
        fields: &mut Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<(), InputError> {
        let fail = |field: String, message: String| InputError { field, message };
        let count = fields.len() as u64;
        if let Some(max) = rules.get("maxProperties").and_then(Value::as_u64) {
            if count > max {
                return Err(fail(
                    at.to_owned(),
                    format!("must have at most {max} fields"),
                ));
            }
        }
        if let Some(min) = rules.get("minProperties").and_then(Value::as_u64) {
            if count < min {
                return Err(fail(
                    at.to_owned(),
                    format!("must have at least {min} fields"),
                ));
            }
        }
        if let Some(Value::Array(required)) = rules.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !fields.contains_key(name) {
                    return Err(fail(format!("{at}.{name}"), "is required".to_owned()));
                }
            }
        }
        let empty = Map::new();
        let properties = match rules.get("properties") {
            Some(Value::Object(properties)) => properties,
            _ => &empty,
        };
        for (name, field) in fields.iter_mut() {
            let path = format!("{at}.{name}");
            match properties.get(name) {
                Some(field_schema) => self.check_at(field_schema, field, &path, depth + 1)?,
                None => match rules.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(fail(path, "is not a known field".to_owned()));
                    }
                    Some(extra) => self.check_at(extra, field, &path, depth + 1)?,
                    None => {}
                },
            }
        }
        Ok(())
    }
}

/// JSON equality as JSON Schema means it: numbers by value (`1` equals `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `type` (one name or several); an integral number written with a fraction becomes an
/// integer when `integer` is what fits.
fn check_type(types: &Value, value: &mut Value) -> Result<(), String> {
    let names: Vec<&str> = match types {
        Value::String(name) => vec![name.as_str()],
        Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let actual = type_name(value);
    if names.contains(&actual) {
        return Ok(());
    }
    if names.contains(&"integer") {
        if let Some(integer) = as_integer(value) {
            *value = integer;
            return Ok(());
        }
    }
    Err(format!("must be {}", names.join(" or ")))
}

/// The integer a number stands for, if it is integral (by its written decimal).
fn as_integer(value: &Value) -> Option<Value> {
    let Value::Number(number) = value else {
        return None;
    };
    let text = number.to_string();
    if let Ok(n) = text.parse::<u64>() {
        return Some(Value::from(n));
    }
    if let Ok(n) = text.parse::<i64>() {
        return Some(Value::from(n));
    }
    let decimal = Decimal::of(value)?;
    if decimal.exponent < 0 {
        return None;
    }
    // Integral but written with a fraction or an exponent: as plain digits.
    let mut digits: String = decimal
        .digits
        .iter()
        .map(|d| char::from(b'0' + d))
        .collect();
    if digits.is_empty() {
        digits.push('0');
    }
    let zeros = usize::try_from(decimal.exponent)
        .ok()
        .filter(|z| *z <= 40)?;
    digits.extend(std::iter::repeat_n('0', zeros));
    let signed = if decimal.negative {
        format!("-{digits}")
    } else {
        digits
    };
    signed
        .parse::<u64>()
        .map(Value::from)
        .or_else(|_| signed.parse::<i64>().map(Value::from))
        .ok()
}

/// A JSON number as written, exactly: its digits without leading or trailing zeros and the
/// power of ten of its last digit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    fn parse(text: &str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty()
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut digits: Vec<u8> = whole
            .bytes()
            .chain(fraction.bytes())
            .map(|b| b - b'0')
            .skip_while(|d| *d == 0)
            .collect();
        let mut exponent = exponent.saturating_sub(fraction.len() as i64);
        while digits.last() == Some(&0) {
            digits.pop();
            exponent = exponent.saturating_add(1);
        }
        if digits.is_empty() {
            return Some(Self {
                negative: false,
                digits,
                exponent: 0,
            });
        }
        Some(Self {
            negative,
            digits,
            exponent,
        })
    }

    /// A JSON number as a validator reads it: exactly when written as an integer, else as the
    /// nearest float (the shortest decimal that reads back as it). `None` for anything else,
    /// and for a number beyond a float's range.
    fn of(value: &Value) -> Option<Self> {
        let Value::Number(number) = value else {
            return None;
        };
        let text = number.to_string();
        if !text.contains(['.', 'e', 'E']) {
            return Self::parse(&text);
        }
        let float = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
        Self::parse(&format!("{float:e}"))
    }

    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let zero = |d: &Self| d.digits.is_empty();
        match (zero(self), zero(other)) {
            (true, true) => return Ordering::Equal,
            (true, false) => {
                return if other.negative {
                    Ordering::Greater
                } else {
                    Ordering::Less
                };
            }
            (false, true) => {
                return if self.negative {
                    Ordering::Less
                } else {
                    Ordering::Greater
                };
            }
            _ => {}
        }
        if self.negative != other.negative {
            return if self.negative {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        // Magnitudes: first by the place of the leading digit, then digit by digit.
        let top = |d: &Self| (d.digits.len() as i64).saturating_add(d.exponent);
        let magnitude = top(self).cmp(&top(other)).then_with(|| {
            let length = self.digits.len().max(other.digits.len());
            let digit = |d: &Self, i: usize| d.digits.get(i).copied().unwrap_or(0);
            (0..length)
                .map(|i| digit(self, i).cmp(&digit(other, i)))
                .find(|o| *o != Ordering::Equal)
                .unwrap_or(Ordering::Equal)
        });
        if self.negative {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

fn check_string(rules: &Map<String, Value>, text: &str) -> Result<(), String> {
    let length = text.chars().count() as u64;
    if let Some(max) = rules.get("maxLength").and_then(Value::as_u64) {
        if length > max {
            return Err(format!("must be at most {max} characters"));
        }
    }
    if let Some(min) = rules.get("minLength").and_then(Value::as_u64) {
        if length < min {
            return Err(if min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {min} characters")
            });
        }
    }
    if let Some(pattern) = rules.get("pattern").and_then(Value::as_str) {
        let regex = regex::Regex::new(pattern)
            .map_err(|_| "cannot be checked (the schema's pattern is invalid)".to_owned())?;
        // JSON Schema validators search the pattern, and their `$` also matches before a final
        // line break.
        let matches = regex.is_match(text)
            || text
                .strip_suffix('\n')
                .is_some_and(|trimmed| pattern.ends_with('$') && regex.is_match(trimmed));
        if !matches {
            return Err(format!("must match the pattern {pattern}"));
        }
    }
    Ok(())
}

fn check_number(rules: &Map<String, Value>, value: &Value) -> Result<(), String> {
    if !value.is_number() {
        return Ok(());
    }
    let Some(number) = Decimal::of(value) else {
        return Err("must be a number within a float's range".to_owned());
    };
    let bound = |name: &str| rules.get(name).and_then(Decimal::of);
    let text = |name: &str| rules.get(name).map(Value::to_string).unwrap_or_default();
    use std::cmp::Ordering::{Greater, Less};
    if bound("maximum").is_some_and(|max| number.cmp(&max) == Greater) {
        return Err(format!("must be at most {}", text("maximum")));
    }
    if bound("minimum").is_some_and(|min| number.cmp(&min) == Less) {
        return Err(format!("must be at least {}", text("minimum")));
    }
    if bound("exclusiveMaximum").is_some_and(|max| number.cmp(&max) != Less) {
        return Err(format!("must be less than {}", text("exclusiveMaximum")));
    }
    if bound("exclusiveMinimum").is_some_and(|min| number.cmp(&min) != Greater) {
        return Err(format!("must be more than {}", text("exclusiveMinimum")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> InputSchema {
        let mut components = Map::new();
        components.insert(
            "Scene".into(),
            json!({"type": "object", "required": ["n"], "additionalProperties": false,
                   "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 50}}}),
        );
        InputSchema::new(
            json!({
                "type": "object",
                "required": ["name"],
                "additionalProperties": false,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 5},
                    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"},
                             "maxItems": 3, "uniqueItems": true},
                    "scene": {"$ref": "#/components/schemas/Scene"},
                    "maybe": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Scene"}]},
                    "mode": {"type": ["string", "null"], "enum": ["mock", "live", null]},
                    "budget": {"type": "number", "minimum": 0, "maximum": 10}
                }
            }),
            components,
        )
    }

    #[test]
    fn what_the_schema_allows_is_accepted_and_normalised() {
        let mut value = json!({"name": "abc", "tags": ["x", "y"], "scene": {"n": 2.0},
                               "maybe": null, "mode": "live", "budget": 9.5});
        schema().check(&mut value).expect("accepted");
        assert_eq!(value["scene"]["n"], json!(2));
        assert!(value["scene"]["n"].is_u64());
        let mut value = json!({"name": "abc", "maybe": {"n": 3.0}});
        schema().check(&mut value).expect("accepted");
        assert!(value["maybe"]["n"].is_u64());
        // A final line break is allowed by `$`, as JSON Schema validators allow it.
        schema()
            .check(&mut json!({"name": "a", "tags": ["x\n"]}))
            .expect("accepted");
    }

    #[test]
    fn what_the_schema_refuses_is_refused_naming_the_field() {
        for (value, field) in [
            (json!({}), "inputs.name"),
            (json!({"name": ""}), "inputs.name"),
            (json!({"name": "toolong"}), "inputs.name"),
            (json!({"name": "a", "extra": 1}), "inputs.extra"),
            (json!({"name": "a", "tags": ["x", "x"]}), "inputs.tags"),
            (
                json!({"name": "a", "tags": ["a", "b", "c", "d"]}),
                "inputs.tags",
            ),
            (json!({"name": "a", "tags": ["X"]}), "inputs.tags.0"),
            (json!({"name": "a", "tags": ["x\n\n"]}), "inputs.tags.0"),
            (json!({"name": "a", "scene": {"n": 51}}), "inputs.scene.n"),
            (json!({"name": "a", "scene": {"n": 1.5}}), "inputs.scene.n"),
            (json!({"name": "a", "scene": {}}), "inputs.scene.n"),
            (json!({"name": "a", "mode": "real"}), "inputs.mode"),
            (json!({"name": "a", "budget": -1}), "inputs.budget"),
            (json!({"name": 5}), "inputs.name"),
        ] {
            let error = schema()
                .check(&mut value.clone())
                .expect_err(&value.to_string());
            assert_eq!(error.field, field, "{value}: {error}");
        }
        let error = schema()
            .check(&mut json!({"name": "a", "maybe": {"n": 0}}))
            .expect_err("refused");
        assert_eq!(error.field, "inputs.maybe.n", "{error}");
    }

    #[test]
    fn numbers_are_compared_as_a_json_schema_validator_compares_them() {
        let schema = InputSchema::new(
            json!({"type": "object", "properties": {
                "money": {"type": "number", "minimum": 0, "maximum": 1000000},
                "n": {"type": "integer", "maximum": 3},
                "big": {"type": "integer", "maximum": 9007199254740993u64},
                "ratio": {"type": "number", "exclusiveMaximum": 1}
            }}),
            Map::new(),
        );
        let parse = |text: &str| -> Value { serde_json::from_str(text).expect("json") };
        for ok in [
            r#"{"money": 1000000}"#,
            r#"{"money": 1000000.000000}"#,
            r#"{"money": 1000000.00000000001}"#,
            r#"{"money": 0.000001}"#,
            r#"{"money": 0.0000001}"#,
            r#"{"money": 1e-6}"#,
            r#"{"money": 12.5e2}"#,
            r#"{"money": -0.0}"#,
            r#"{"n": 3.0}"#,
            r#"{"n": 30e-1}"#,
            r#"{"n": 3.0000000000000001}"#,
            r#"{"big": 9007199254740993}"#,
            r#"{"ratio": 0.9999999999999999}"#,
        ] {
            schema.check(&mut parse(ok)).expect(ok);
        }
        for refused in [
            r#"{"money": 1000000.0000000001}"#,
            r#"{"money": -0.000001}"#,
            r#"{"money": 1e7}"#,
            r#"{"money": 1e99999999999999999999}"#,
            r#"{"money": 1e400}"#,
            r#"{"n": 3.1}"#,
            r#"{"n": 4}"#,
            r#"{"big": 9007199254740994}"#,
            r#"{"ratio": 0.99999999999999999999}"#,
            r#"{"ratio": 1.0}"#,
            r#"{"ratio": 1e0}"#,
        ] {
            assert!(schema.check(&mut parse(refused)).is_err(), "{refused}");
        }
        let mut integral = parse(r#"{"n": 3.0000000000000001}"#);
        schema.check(&mut integral).expect("integral");
        assert_eq!(integral["n"], json!(3));
    }

    #[test]
    fn characters_not_bytes_are_counted() {
        schema()
            .check(&mut json!({"name": "ééééé"}))
            .expect("five characters");
    }
}
