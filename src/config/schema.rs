//! The JSON schemas of pipeline and profile files, generated from the same Rust types that
//! read them (each kind's settings struct), so editors can validate and complete them.
//!
//! A stage is keyed on its `kind`: the Stage definition declares the stage-level keys
//! (with `additionalProperties: false`) and an `enum` of kind names, and one `if`/`then`
//! per kind gives `with:` that kind's settings. Editors then report the bad key or kind
//! itself, where a `oneOf` of one object per kind only said "not valid under any of the
//! given schemas".

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::stages::KINDS;

/// The schema of a pipeline file, as pretty JSON with a trailing newline.
pub fn pipeline_schema_text() -> String {
    pretty(&pipeline_schema())
}

/// The schema of a profile file (`profiles/NAME.yaml`), as pretty JSON with a trailing
/// newline.
pub fn profile_schema_text() -> String {
    pretty(&profile_schema())
}

fn pretty(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}

/// The schema of a pipeline file.
pub fn pipeline_schema() -> Value {
    let (mut defs, settings) = kind_settings();
    let kind_names: Vec<&str> = KINDS.iter().map(|kind| kind.name).collect();
    let branches: Vec<Value> = KINDS
        .iter()
        .zip(settings)
        .map(|(kind, settings)| {
            json!({
                // `required` too: without it an absent `kind` would match every branch.
                "if": { "properties": { "kind": { "const": kind.name } }, "required": ["kind"] },
                "then": { "description": kind.summary, "properties": { "with": settings } },
            })
        })
        .collect();
    defs.insert(
        "Stage".to_string(),
        json!({
            "type": "object",
            "description": "A stage: its `kind` says what it does and which settings `with:` takes.",
            "properties": {
                "kind": { "enum": kind_names, "description": kind_list() },
                "description": { "type": "string" },
                "inputs": { "$ref": "#/$defs/Inputs" },
                "with": { "type": "object", "description": "The kind's settings." },
                "resources": { "$ref": "#/$defs/Resources" },
            },
            "required": ["kind"],
            "additionalProperties": false,
            "allOf": branches,
        }),
    );
    // Inline profiles are loose per kind (which kind a stage overlay changes is not
    // known here); a profile file gets the stricter profile schema.
    let loose_kinds: Vec<(&str, Value)> = KINDS
        .iter()
        .map(|kind| (kind.name, json!({ "type": "object" })))
        .collect();
    defs.insert("Overlay".to_string(), overlay(&loose_kinds));
    defs.insert("PipelineOverlay".to_string(), pipeline_overlay());
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "trainyard pipeline",
        "type": "object",
        "properties": {
            "name": { "type": "string" },
            "description": { "type": "string" },
            "seed": { "type": "integer", "minimum": 0 },
            "vars": { "$ref": "#/$defs/Vars" },
            "executor": { "$ref": "#/$defs/ExecutorSettings" },
            "stages": { "type": "object", "additionalProperties": { "$ref": "#/$defs/Stage" } },
            "profiles": { "type": "object", "additionalProperties": { "$ref": "#/$defs/Overlay" } },
        },
        "required": ["name", "stages"],
        "additionalProperties": false,
        "$defs": defs,
    })
}

/// The schema of a profile file: an overlay whose `kinds.KIND` entries are checked
/// against that kind's settings, with nothing required (an overlay changes some keys).
pub fn profile_schema() -> Value {
    let (mut defs, settings) = kind_settings();
    for schema in defs.values_mut() {
        drop_required(schema);
    }
    let kinds: Vec<(&str, Value)> = KINDS
        .iter()
        .zip(settings)
        .map(|(kind, mut settings)| {
            // `kinds.K.resources` sets the resources of every stage of the kind.
            if let Some(Value::Object(properties)) = settings.get_mut("properties") {
                properties.insert(
                    "resources".to_string(),
                    json!({ "$ref": "#/$defs/Resources" }),
                );
            }
            (kind.name, settings)
        })
        .collect();
    let mut schema = overlay(&kinds);
    defs.insert("PipelineOverlay".to_string(), pipeline_overlay());
    let object = schema
        .as_object_mut()
        .expect("an overlay is an object schema");
    object.insert(
        "$schema".to_string(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    object.insert("title".to_string(), json!("trainyard profile"));
    object.insert("$defs".to_string(), Value::Object(defs));
    schema
}

/// The definitions shared by both schemas, and each kind's settings schema in `KINDS`
/// order.
fn kind_settings() -> (Map<String, Value>, Vec<Value>) {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let settings: Vec<Value> = KINDS
        .iter()
        .map(|kind| kind.schema(&mut generator).to_value())
        .collect();
    generator.subschema_for::<crate::config::ExecutorSettings>();
    generator.subschema_for::<crate::config::Resources>();
    let mut defs = Map::new();
    for (name, mut schema) in generator.take_definitions(true) {
        accept_var_refs(&mut schema);
        defs.insert(name, schema);
    }
    defs.insert(
        "VarRef".to_string(),
        json!({
            "type": "string",
            "pattern": "^\\$\\{vars\\.[^}]+\\}$",
            "description": "`${vars.NAME}`: the variable's value, with its type.",
        }),
    );
    defs.insert(
        "Inputs".to_string(),
        json!({
            "type": "object",
            "description": "Input name → a stage reference (`STAGE` or `STAGE/path/inside`), a file or directory path relative to the pipeline file (`./x` forces a path), or, for a model or tokenizer, `hf:org/name[@revision]` from the local Hugging Face cache. `${vars.NAME}` uses a variable.",
            "additionalProperties": { "type": "string" },
        }),
    );
    defs.insert(
        "Vars".to_string(),
        json!({
            "type": "object",
            "description": "Pipeline variables: `${vars.NAME}` in any stage's `with:` or `inputs:` is replaced by the value (keeping its type when it is the whole value); `$${` is a literal `${`. Set or change them in profiles, TRAINYARD_VARS__NAME or --set vars.NAME=value.",
        }),
    );
    defs.insert(
        "StageOverlay".to_string(),
        json!({
            "type": "object",
            "description": "Changes to one existing stage of the pipeline.",
            "properties": {
                "description": { "type": "string" },
                "inputs": { "$ref": "#/$defs/Inputs" },
                "with": { "type": "object", "description": "Settings, merged over the stage's own." },
                "resources": { "$ref": "#/$defs/Resources" },
            },
            "additionalProperties": false,
        }),
    );
    (defs, settings)
}

/// A profile, inline (`profiles.NAME`) or in its own file: `kinds` maps each kind name to
/// `kinds` schema, so a misspelt kind is named.
fn overlay(kinds: &[(&str, Value)]) -> Value {
    let kinds: Map<String, Value> = kinds
        .iter()
        .map(|(name, schema)| (name.to_string(), schema.clone()))
        .collect();
    json!({
        "type": "object",
        "description": "A profile: values deep-merged over the pipeline. `kinds.KIND` applies settings to every stage of that kind; `pipelines.NAME` applies only to the pipeline of that name.",
        "properties": {
            "description": { "type": "string" },
            "seed": { "type": "integer", "minimum": 0 },
            "vars": { "$ref": "#/$defs/Vars" },
            "executor": { "$ref": "#/$defs/ExecutorSettings" },
            "stages": { "type": "object", "additionalProperties": { "$ref": "#/$defs/StageOverlay" } },
            "kinds": { "type": "object", "properties": kinds, "additionalProperties": false },
            "pipelines": { "type": "object", "additionalProperties": { "$ref": "#/$defs/PipelineOverlay" } },
        },
        "additionalProperties": false,
    })
}

/// `pipelines.NAME` of a profile: merged over that pipeline only.
fn pipeline_overlay() -> Value {
    json!({
        "type": "object",
        "description": "Values merged over the pipeline of this name only (they win over `kinds`).",
        "properties": {
            "seed": { "type": "integer", "minimum": 0 },
            "vars": { "$ref": "#/$defs/Vars" },
            "stages": { "type": "object", "additionalProperties": { "$ref": "#/$defs/StageOverlay" } },
        },
        "additionalProperties": false,
    })
}

/// Lets every setting be a whole `${vars.NAME}`, which the loader replaces by a value of
/// any type before the settings are read; without this, pipelines that use variables
/// would not validate.
fn accept_var_refs(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for property in properties.values_mut() {
            accept_var_refs(property);
            let accepts_text = property.get("type") == Some(&json!("string"));
            if let (false, Value::Object(fields)) = (accepts_text, property) {
                // Description and default stay outside, where editors show them.
                let mut outer = Map::new();
                for key in ["description", "default"] {
                    if let Some(value) = fields.remove(key) {
                        outer.insert(key.to_string(), value);
                    }
                }
                // `if`/`else` rather than `anyOf`, so a wrong value is reported against
                // the setting's own type, not as "does not match `${vars.…}`".
                let inner = std::mem::take(fields);
                outer.insert("if".to_string(), json!({ "$ref": "#/$defs/VarRef" }));
                outer.insert("else".to_string(), Value::Object(inner));
                *fields = outer;
            }
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = object.get_mut(key) {
            accept_var_refs(child);
        }
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(Value::Array(children)) = object.get_mut(key) {
            children.iter_mut().for_each(accept_var_refs);
        }
    }
}

/// Removes every `required` list: a profile may set any one key of a settings object.
fn drop_required(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if matches!(object.get("required"), Some(Value::Array(_))) {
        object.remove("required");
    }
    for (key, child) in object.iter_mut() {
        match (key.as_str(), child) {
            // Literal data, not schemas.
            ("default" | "const" | "enum" | "examples", _) => {}
            // Maps of names to schemas: a property may itself be called `required`.
            ("properties" | "$defs", Value::Object(children)) => {
                children.values_mut().for_each(drop_required)
            }
            (_, Value::Array(children)) => children.iter_mut().for_each(drop_required),
            (_, child) => drop_required(child),
        }
    }
}

/// Each kind's name and summary, one a line, for the `kind` key's description.
fn kind_list() -> String {
    let lines: Vec<String> = KINDS
        .iter()
        .map(|kind| format!("- `{}`: {}", kind.name, kind.summary))
        .collect();
    format!("The stage kind:\n{}", lines.join("\n"))
}
