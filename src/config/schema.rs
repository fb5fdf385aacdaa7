//! The JSON schema of pipeline files, generated from the same Rust types that read them
//! (each kind's settings struct), so editors can validate and complete pipelines.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::stages::KINDS;

/// The schema of a pipeline file, as pretty JSON with a trailing newline.
pub fn pipeline_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&pipeline_schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// The schema of a pipeline file.
pub fn pipeline_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let variants: Vec<Value> = KINDS
        .iter()
        .map(|kind| {
            let settings = kind.schema(&mut generator);
            json!({
                "type": "object",
                "description": kind.summary,
                "properties": {
                    "kind": { "const": kind.name },
                    "description": { "type": "string" },
                    "inputs": { "$ref": "#/$defs/Inputs" },
                    "with": settings,
                },
                "required": ["kind"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut defs = serde_json::Map::new();
    for (name, schema) in generator.take_definitions(true) {
        defs.insert(name, schema);
    }
    defs.insert(
        "Inputs".to_string(),
        json!({
            "type": "object",
            "description": "Input name → a stage reference (`STAGE` or `STAGE/path/inside`), a file or directory path relative to the pipeline file (`./x` forces a path), or, for a model or tokenizer, `hf:org/name[@revision]` from the local Hugging Face cache. `${vars.NAME}` uses a variable.",
            "additionalProperties": { "type": "string" },
        }),
    );
    defs.insert("Stage".to_string(), json!({ "oneOf": variants }));
    defs.insert(
        "Vars".to_string(),
        json!({
            "type": "object",
            "description": "Pipeline variables: `${vars.NAME}` in any stage's `with:` or `inputs:` is replaced by the value (keeping its type when it is the whole value); `$${` is a literal `${`. Set or change them in profiles, TRAINYARD_VARS__NAME or --set vars.NAME=value.",
        }),
    );
    defs.insert(
        "Overlay".to_string(),
        json!({
            "type": "object",
            "description": "A profile: values deep-merged over the pipeline. `kinds.KIND` applies settings to every stage of that kind.",
            "properties": {
                "description": { "type": "string" },
                "seed": { "type": "integer", "minimum": 0 },
                "vars": { "$ref": "#/$defs/Vars" },
                "stages": { "type": "object", "additionalProperties": { "type": "object" } },
                "kinds": { "type": "object", "additionalProperties": { "type": "object" } },
            },
            "additionalProperties": false,
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "trainyard pipeline",
        "type": "object",
        "properties": {
            "name": { "type": "string" },
            "description": { "type": "string" },
            "seed": { "type": "integer", "minimum": 0 },
            "vars": { "$ref": "#/$defs/Vars" },
            "stages": { "type": "object", "additionalProperties": { "$ref": "#/$defs/Stage" } },
            "profiles": { "type": "object", "additionalProperties": { "$ref": "#/$defs/Overlay" } },
        },
        "required": ["name", "stages"],
        "additionalProperties": false,
        "$defs": defs,
    })
}
