//! The `ingest` stage, end to end through the binary: every source format, every kind of
//! bad input with `on_error: fail` and `skip`, the filters, the split, and caching.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::Sandbox;
use serde_json::{Value, json};

/// A pipeline with one ingest stage `corpus`; `inputs` and `with` are YAML flow maps.
fn pipeline(seed: u64, inputs: &str, with: &str) -> String {
    format!(
        "name: ingest-test\nseed: {seed}\nstages:\n  corpus:\n    kind: ingest\n    inputs: {inputs}\n    with: {with}\n"
    )
}

fn sandbox_with(inputs: &str, with: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", &pipeline(1, inputs, with));
    sandbox
}

/// The JSON lines of an output file of the latest run.
fn lines(sandbox: &Sandbox, file: &str) -> Vec<Value> {
    sandbox
        .read(&format!("runs/latest/outputs/corpus/{file}"))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

/// The raw lines of an output file of the latest run.
fn line_set(sandbox: &Sandbox, file: &str) -> BTreeSet<String> {
    sandbox
        .read(&format!("runs/latest/outputs/corpus/{file}"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// train + eval lines, in that order.
fn corpus(sandbox: &Sandbox) -> Vec<Value> {
    let mut all = lines(sandbox, "train.jsonl");
    all.extend(lines(sandbox, "eval.jsonl"));
    all
}

fn texts(sandbox: &Sandbox) -> BTreeSet<String> {
    corpus(sandbox)
        .iter()
        .map(|record| record["text"].as_str().unwrap().to_string())
        .collect()
}

fn stats(sandbox: &Sandbox) -> Value {
    serde_json::from_str(&sandbox.read("runs/latest/outputs/corpus/stats.json")).unwrap()
}

/// `documents_read - split + pieces = kept + dropped`, and `kept = train + eval`.
fn assert_counts_add_up(stats: &Value) {
    let n = |v: &Value| v.as_u64().unwrap();
    let dropped: u64 = stats["dropped"].as_object().unwrap().values().map(n).sum();
    assert_eq!(
        n(&stats["documents_read"]) - n(&stats["split_long"]["documents"])
            + n(&stats["split_long"]["pieces"]),
        n(&stats["kept"]) + dropped,
        "{stats:#}"
    );
    assert_eq!(
        n(&stats["kept"]),
        n(&stats["train"]) + n(&stats["eval"]),
        "{stats:#}"
    );
}

#[test]
fn jsonl_reads_text_body_text_and_joined_chunks_keeping_metadata() {
    let sandbox = sandbox_with(
        "{ web: data/web.jsonl }",
        "{ sources: [{ jsonl: { input: web } }], eval_ratio: 0 }",
    );
    sandbox.write(
        "data/web.jsonl",
        concat!(
            r#"{"text": "plain text", "url": "https://a.example/1", "chunk_id": 3}"#,
            "\n\n",
            r#"{"body_text": "body text", "section_path": ["Intro", "Why"]}"#,
            "\n",
            r#"{"url": "https://b.example", "chunks": [{"text": "one"}, {"text": "two"}]}"#,
            "\n"
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    let records = lines(&sandbox, "train.jsonl");
    assert_eq!(
        records,
        [
            json!({"text": "plain text", "source_url": "https://a.example/1", "chunk_id": "3"}),
            json!({"text": "body text", "section_path": "Intro > Why"}),
            json!({"text": "one\n\ntwo", "source_url": "https://b.example"}),
        ]
    );
    assert_eq!(lines(&sandbox, "eval.jsonl"), Vec::<Value>::new());
    let stats = stats(&sandbox);
    assert_eq!(
        (stats["documents_read"].as_u64(), stats["kept"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(stats["chars"]["train"], json!(10 + 9 + 8));
    assert_eq!(stats["per_source"][0]["source"], "jsonl:web");
    assert_counts_add_up(&stats);
}

#[test]
fn jsonl_chunks_split_gives_one_document_per_chunk_and_a_named_text_field() {
    let sandbox = sandbox_with(
        "{ web: data/web.jsonl, other: data/other.jsonl }",
        "{ sources: [{ jsonl: { input: web, chunks: split } }, { jsonl: { input: other, text_field: content } }], eval_ratio: 0 }",
    );
    sandbox.write(
        "data/web.jsonl",
        "{\"url\": \"u\", \"section_path\": \"S\", \"chunks\": [{\"text\": \"one\", \"chunk_id\": \"c1\"}, {\"text\": \"two\", \"section_path\": \"T\"}]}\n",
    );
    sandbox.write(
        "data/other.jsonl",
        "{\"content\": \"from content\", \"text\": \"ignored\"}\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        lines(&sandbox, "train.jsonl"),
        [
            json!({"text": "one", "source_url": "u", "chunk_id": "c1", "section_path": "S"}),
            json!({"text": "two", "source_url": "u", "chunk_id": "1", "section_path": "T"}),
            json!({"text": "from content"}),
        ]
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["per_source"][1]["source"], "jsonl:other");
    assert_eq!(stats["per_source"][0]["kept"], 2);
}

#[test]
fn chat_jsonl_normalises_openai_tool_calls_keeping_ids_tools_and_key_order() {
    let sandbox = sandbox_with(
        "{ chats: data/chats.jsonl }",
        "{ source: { chat_jsonl: { input: chats } }, eval_ratio: 0 }",
    );
    let line = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "assistant", "content": "Rain."}
    ], "url": "chat://1"});
    sandbox.write("data/chats.jsonl", &format!("{line}\n"));
    sandbox.ok(&["run", "p.yaml"]);
    let records = lines(&sandbox, "train.jsonl");
    assert_eq!(
        records,
        [json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]},
            {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "Rain."}
        ], "source_url": "chat://1"})]
    );
    // The records read back as the shared record type.
    let parsed: trainyard::data::records::ChatRecord =
        serde_json::from_value(records[0].clone()).unwrap();
    assert_eq!(parsed.messages[2].tool_calls[0].arguments["days"], 2);
    assert_eq!(stats(&sandbox)["records"], "chat");
    // Tool definitions pass through, and every object keeps its author's key order (a
    // chat template prints them with tojson, in order).
    let line = r#"{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{\"z\": 1, \"a\": {\"y\": 2, \"b\": 3}}"}}]}, {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}], "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}}}]}"#;
    sandbox.write("data/chats.jsonl", &format!("{line}\n"));
    sandbox.ok(&["run", "p.yaml"]);
    let written = sandbox.read("runs/latest/outputs/corpus/train.jsonl");
    assert!(
        written.contains(r#""arguments":{"z":1,"a":{"y":2,"b":3}}"#),
        "{written}"
    );
    assert!(
        written.contains(r#""tools":[{"type":"function","function":{"name":"w","parameters":{"type":"object","properties":{"z":{},"a":{}}}}}]"#),
        "{written}"
    );
}

#[test]
fn files_glob_is_recursive_with_relative_source_url() {
    let sandbox = sandbox_with(
        "{ notes: data/vault }",
        "{ source: { files: { input: notes } }, eval_ratio: 0 }",
    );
    sandbox.write("data/vault/Home.md", "# Home\nWelcome.");
    sandbox.write("data/vault/daily/2024-01-02.md", "Did things.");
    sandbox.write("data/vault/deep/er/notes.txt", "Plain text note.");
    sandbox.write("data/vault/.obsidian/app.json", "{}");
    sandbox.write("data/vault/image.png", "not text");
    sandbox.ok(&["run", "p.yaml"]);
    let records = lines(&sandbox, "train.jsonl");
    let urls: Vec<&str> = records
        .iter()
        .map(|r| r["source_url"].as_str().unwrap())
        .collect();
    assert_eq!(
        urls,
        ["Home.md", "daily/2024-01-02.md", "deep/er/notes.txt"]
    );
    assert_eq!(records[0]["text"], "# Home\nWelcome.");

    // A narrower glob: markdown directly in the top directory only.
    sandbox.write(
        "p.yaml",
        &pipeline(
            1,
            "{ notes: data/vault }",
            "{ source: { files: { input: notes, glob: \"*.md\" } }, eval_ratio: 0 }",
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        texts(&sandbox),
        BTreeSet::from(["# Home\nWelcome.".to_string()])
    );
}

#[test]
fn dialogues_split_on_the_delimiter_and_drop_empty_blocks() {
    let sandbox = sandbox_with(
        "{ dlg: data/dialogues.txt, other: data/other.txt }",
        "{ sources: [{ dialogues: { input: dlg } }, { dialogues: { input: other, delimiter: \"\\n---\\n\" } }], eval_ratio: 0 }",
    );
    sandbox.write(
        "data/dialogues.txt",
        "A: Hi.\nB: Hello.\n\n<dialogue>\n\nA: Bye.\nB: Bye!\n\n<dialogue>\n\n   \n\n<dialogue>\n\n",
    );
    sandbox.write("data/other.txt", "x: 1\n---\ny: 2\n");
    sandbox.ok(&["run", "p.yaml"]);
    let got: Vec<String> = lines(&sandbox, "train.jsonl")
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        ["A: Hi.\nB: Hello.", "A: Bye.\nB: Bye!", "x: 1", "y: 2"]
    );
}

/// Writes a Parquet file like a Hugging Face dataset shard: an optional UTF-8 `text`
/// column and an int64 `id`, zstd-compressed, in row groups of `group_rows`.
fn write_parquet(path: &std::path::Path, rows: &[Option<String>], group_rows: usize) {
    use parquet::basic::{Compression, LogicalType, Repetition, Type as Physical, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;

    let text = Type::primitive_type_builder("text", Physical::BYTE_ARRAY)
        .with_repetition(Repetition::OPTIONAL)
        .with_logical_type(Some(LogicalType::String))
        .build()
        .unwrap();
    let id = Type::primitive_type_builder("id", Physical::INT64)
        .with_repetition(Repetition::REQUIRED)
        .build()
        .unwrap();
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![Arc::new(text), Arc::new(id)])
        .build()
        .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    for (group, chunk) in rows.chunks(group_rows).enumerate() {
        let mut row_group = writer.next_row_group().unwrap();
        let values: Vec<ByteArray> = chunk
            .iter()
            .flatten()
            .map(|t| ByteArray::from(t.as_str()))
            .collect();
        let levels: Vec<i16> = chunk.iter().map(|r| i16::from(r.is_some())).collect();
        let mut column = row_group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&levels), None)
            .unwrap();
        column.close().unwrap();
        let ids: Vec<i64> = (0..chunk.len())
            .map(|i| (group * group_rows + i) as i64)
            .collect();
        let mut column = row_group.next_column().unwrap().unwrap();
        column
            .typed::<Int64Type>()
            .write_batch(&ids, None, None)
            .unwrap();
        column.close().unwrap();
        row_group.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_column_is_read_across_row_groups() {
    let sandbox = sandbox_with(
        "{ hf: data/hf }",
        "{ source: { parquet: { input: hf, column: text } }, eval_ratio: 0 }",
    );
    let rows: Vec<Option<String>> = (0..2500).map(|i| Some(format!("row number {i}"))).collect();
    write_parquet(
        &sandbox.path("data/hf/train-00000-of-00002.parquet"),
        &rows[..2000],
        700,
    );
    write_parquet(
        &sandbox.path("data/hf/train-00001-of-00002.parquet"),
        &rows[2000..],
        700,
    );
    sandbox.ok(&["run", "p.yaml"]);
    let got: Vec<String> = lines(&sandbox, "train.jsonl")
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = rows.into_iter().flatten().collect();
    assert_eq!(got, want);
}

#[test]
fn parquet_file_written_by_pyarrow_is_read() {
    // tests/fixtures/hf_pyarrow.parquet: made by tests/fixtures/make_hf_parquet.py.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_pyarrow.parquet"
    );
    let sandbox = sandbox_with(
        "{ hf: data/hf.parquet }",
        "{ source: { parquet: { input: hf } }, eval_ratio: 0, on_error: skip }",
    );
    std::fs::create_dir_all(sandbox.path("data")).unwrap();
    std::fs::copy(fixture, sandbox.path("data/hf.parquet")).unwrap();
    sandbox.ok(&["run", "p.yaml"]);
    let records = lines(&sandbox, "train.jsonl");
    assert_eq!(records.len(), 299, "300 rows, one of them null");
    assert_eq!(
        records[0]["text"],
        "Document 0: the quick brown fox — ünïcödé ✓"
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["invalid"], json!({"null": 1}));
}

#[test]
fn synthetic_documents_conversations_and_questions() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        "name: s\nseed: 42\nstages:\n  corpus:\n    kind: ingest\n    with: { source: { synthetic: { documents: 400, questions: 30 } }, min_chars: 40, eval_ratio: 0.1 }\n  chat:\n    kind: ingest\n    with: { source: { synthetic: { part: conversations, documents: 400, conversations: 50, questions: 30 } } }\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    let docs = corpus(&sandbox);
    let stats = stats(&sandbox);
    assert_eq!(stats["documents_read"], 400);
    assert_eq!(docs.len() as u64, stats["kept"].as_u64().unwrap());
    assert!(docs.len() > 300, "{stats:#}");
    assert!(!lines(&sandbox, "eval.jsonl").is_empty());
    assert!(
        docs[0]["source_url"]
            .as_str()
            .unwrap()
            .starts_with("synthetic://")
    );
    assert!(docs[0]["chunk_id"].is_string());
    let questions = lines(&sandbox, "questions.jsonl");
    assert_eq!(questions.len(), 30);
    assert!(
        questions
            .iter()
            .all(|q| q["question"].is_string() && q["answer"].is_string())
    );

    let conversations: Vec<Value> = sandbox
        .read("runs/latest/outputs/chat/train.jsonl")
        .lines()
        .chain(sandbox.read("runs/latest/outputs/chat/eval.jsonl").lines())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let chat_stats: Value =
        serde_json::from_str(&sandbox.read("runs/latest/outputs/chat/stats.json")).unwrap();
    assert_eq!(chat_stats["records"], "chat");
    assert_eq!(chat_stats["documents_read"], 50);
    // Short synthetic conversations can repeat exactly; de-duplication drops the repeats.
    assert_eq!(
        conversations.len() as u64 + chat_stats["dropped"]["duplicate"].as_u64().unwrap(),
        50
    );
    assert!(conversations.len() > 40);
    for conversation in &conversations {
        let messages = conversation["messages"].as_array().unwrap();
        assert_eq!(messages.last().unwrap()["role"], "assistant");
    }
    assert_eq!(
        sandbox.read("runs/latest/outputs/chat/questions.jsonl"),
        sandbox.read("runs/latest/outputs/corpus/questions.jsonl"),
        "same seed and world settings: the same held-out questions"
    );
}

// ---- bad input ----

const WEB: &str = "{\"text\": \"first\"}\n{\"text\": \"second\"}\n{\"text\": \"third\", oops}\n{\"title\": \"no text\"}\n{\"text\": \"fifth\"}\n";

#[test]
fn malformed_jsonl_line_fails_with_file_line_and_reason() {
    let sandbox = sandbox_with(
        "{ web: data/web.jsonl }",
        "{ source: { jsonl: { input: web } } }",
    );
    sandbox.write("data/web.jsonl", WEB);
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        error.contains("data/web.jsonl:3: invalid JSON at column 19: key must be a string"),
        "{error}"
    );
    assert!(
        sandbox.store_entries("corpus").is_empty(),
        "nothing published"
    );

    sandbox.write(
        "data/web.jsonl",
        "{\"text\": \"first\"}\n{\"title\": \"no text\"}\n",
    );
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        error.contains(r#"data/web.jsonl:2: expected a "text", "body_text" or "chunks" field"#),
        "{error}"
    );
}

#[test]
fn on_error_skip_skips_malformed_lines_and_counts_them_by_reason() {
    let sandbox = sandbox_with(
        "{ web: data/web.jsonl }",
        "{ source: { jsonl: { input: web } }, on_error: skip, eval_ratio: 0 }",
    );
    sandbox.write("data/web.jsonl", WEB);
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        texts(&sandbox),
        BTreeSet::from(["first", "second", "fifth"].map(String::from))
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["dropped"]["invalid"], 2);
    assert_eq!(
        stats["invalid"],
        json!({"json_syntax": 1, "missing_text": 1})
    );
    assert_eq!(stats["documents_read"], 5);
    assert_counts_add_up(&stats);
}

const BAD_CHATS: &[(&str, &str, &str)] = &[
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#,
        "unknown_role",
        r#"messages[1].role: unknown role "robot" (expected system, user, assistant or tool)"#,
    ),
    (
        r#"{"messages": []}"#,
        "empty_conversation",
        "empty conversation",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}"#,
        "not_ending_on_assistant",
        "the conversation ends on a user turn (messages[2]); it must end on an assistant turn",
    ),
];

const GOOD_CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

#[test]
fn invalid_conversations_fail_with_file_line_and_message_index() {
    for (bad, _, reason) in BAD_CHATS {
        let sandbox = sandbox_with(
            "{ chats: data/c.jsonl }",
            "{ source: { chat_jsonl: { input: chats } } }",
        );
        sandbox.write("data/c.jsonl", &format!("{GOOD_CHAT}\n{bad}\n"));
        let error = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            error.contains(&format!("data/c.jsonl:2: {reason}")),
            "{error}"
        );
    }
}

#[test]
fn invalid_conversations_are_skipped_and_counted_with_on_error_skip() {
    let sandbox = sandbox_with(
        "{ chats: data/c.jsonl }",
        "{ source: { chat_jsonl: { input: chats } }, on_error: skip }",
    );
    let mut content = format!("{GOOD_CHAT}\n");
    for (bad, _, _) in BAD_CHATS {
        content.push_str(bad);
        content.push('\n');
    }
    sandbox.write("data/c.jsonl", &content);
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(corpus(&sandbox).len(), 1);
    let stats = stats(&sandbox);
    let expected: serde_json::Map<String, Value> = BAD_CHATS
        .iter()
        .map(|(_, key, _)| (key.to_string(), json!(1)))
        .collect();
    assert_eq!(stats["invalid"], Value::Object(expected));
    assert_eq!(stats["dropped"]["invalid"], 3);
    assert_counts_add_up(&stats);
}

#[test]
fn parquet_missing_column_fails_naming_file_and_columns_even_with_skip() {
    for policy in ["fail", "skip"] {
        let sandbox = sandbox_with(
            "{ hf: data/t.parquet }",
            &format!(
                "{{ source: {{ parquet: {{ input: hf, column: content }} }}, on_error: {policy} }}"
            ),
        );
        write_parquet(
            &sandbox.path("data/t.parquet"),
            &[Some("x".to_string())],
            10,
        );
        let error = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            error
                .contains(r#"data/t.parquet: no column "content"; the file has columns: text, id"#),
            "{error}"
        );
    }
}

#[test]
fn parquet_null_values_fail_or_are_skipped() {
    let rows = [Some("a".to_string()), None, Some("c".to_string())];
    let sandbox = sandbox_with(
        "{ hf: data/t.parquet }",
        "{ source: { parquet: { input: hf } } }",
    );
    write_parquet(&sandbox.path("data/t.parquet"), &rows, 10);
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(
        error.contains(r#"data/t.parquet: row 1: column "text" is null"#),
        "{error}"
    );
    sandbox.write(
        "p.yaml",
        &pipeline(
            1,
            "{ hf: data/t.parquet }",
            "{ source: { parquet: { input: hf } }, on_error: skip }",
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(corpus(&sandbox).len(), 2);
    assert_eq!(stats(&sandbox)["invalid"], json!({"null": 1}));
}

#[test]
fn mixing_chat_and_text_sources_is_a_config_error() {
    for policy in ["fail", "skip"] {
        let sandbox = sandbox_with(
            "{ chats: data/c.jsonl, web: data/w.jsonl }",
            &format!(
                "{{ sources: [{{ chat_jsonl: {{ input: chats }} }}, {{ jsonl: {{ input: web }} }}], on_error: {policy} }}"
            ),
        );
        sandbox.write("data/c.jsonl", &format!("{GOOD_CHAT}\n"));
        sandbox.write("data/w.jsonl", "{\"text\": \"t\"}\n");
        let error = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            error.contains("source 1 (chat_jsonl:chats) yields conversations but source 2 (jsonl:web) yields text documents"),
            "{error}"
        );
        assert!(
            error.contains("p.yaml:"),
            "points into the pipeline file: {error}"
        );
        assert!(!sandbox.path("runs").exists(), "nothing ran");
    }
}

#[test]
fn a_source_naming_an_unknown_input_is_a_config_error() {
    for policy in ["fail", "skip"] {
        let sandbox = sandbox_with(
            "{ web: data/w.jsonl }",
            &format!("{{ source: {{ jsonl: {{ input: wbe }} }}, on_error: {policy} }}"),
        );
        sandbox.write("data/w.jsonl", "{\"text\": \"t\"}\n");
        let error = sandbox.fails(&["status", "p.yaml"]);
        assert!(
            error.contains("source 1 (jsonl) reads input `wbe`, which is not under `inputs:` (declared inputs: web); did you mean `web`?"),
            "{error}"
        );
    }
}

#[test]
fn unknown_source_format_and_unknown_keys_are_config_errors() {
    let sandbox = sandbox_with(
        "{ web: data/w.jsonl }",
        "{ source: { jsnl: { input: web } } }",
    );
    sandbox.write("data/w.jsonl", "{\"text\": \"t\"}\n");
    let error = sandbox.fails(&["status", "p.yaml"]);
    assert!(error.contains("jsnl"), "{error}");
    sandbox.write(
        "p.yaml",
        &pipeline(
            1,
            "{ web: data/w.jsonl }",
            "{ source: { jsonl: { input: web, text_feild: x } } }",
        ),
    );
    let error = sandbox.fails(&["status", "p.yaml"]);
    assert!(error.contains("unknown key `text_feild`"), "{error}");
}

// ---- filters ----

#[test]
fn min_and_max_chars_drop_short_and_long_documents() {
    let sandbox = sandbox_with(
        "{ web: data/w.jsonl }",
        "{ source: { jsonl: { input: web } }, min_chars: 5, max_chars: 10, eval_ratio: 0 }",
    );
    sandbox.write(
        "data/w.jsonl",
        "{\"text\": \"four\"}\n{\"text\": \"fives\"}\n{\"text\": \"exactly10!\"}\n{\"text\": \"eleven char\"}\n{\"text\": \"ünïcödé!\"}\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        texts(&sandbox),
        BTreeSet::from(["fives", "exactly10!", "ünïcödé!"].map(String::from)),
        "lengths count characters, not bytes"
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["dropped"]["too_short"], 1);
    assert_eq!(stats["dropped"]["too_long"], 1);
    assert_counts_add_up(&stats);
}

#[test]
fn long_split_cuts_at_boundaries_into_pieces_with_chunk_suffixes() {
    let sandbox = sandbox_with(
        "{ web: data/w.jsonl }",
        "{ source: { jsonl: { input: web } }, max_chars: 30, long: split, min_chars: 3, eval_ratio: 0 }",
    );
    let long = "First paragraph is here.\n\nSecond one has two sentences. It ends now.";
    sandbox.write(
        "data/w.jsonl",
        &format!(
            "{}\n{}\n",
            json!({"text": long, "chunk_id": "c7", "url": "u"}),
            json!({"text": "short"})
        ),
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        lines(&sandbox, "train.jsonl"),
        [
            json!({"text": "First paragraph is here.", "chunk_id": "c7#0", "source_url": "u"}),
            json!({"text": "Second one has two sentences.", "chunk_id": "c7#1", "source_url": "u"}),
            json!({"text": "It ends now.", "chunk_id": "c7#2", "source_url": "u"}),
            json!({"text": "short"}),
        ]
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["split_long"], json!({"documents": 1, "pieces": 3}));
    assert_counts_add_up(&stats);
}

#[test]
fn exact_duplicates_after_normalisation_are_dropped() {
    let sandbox = sandbox_with(
        "{ a: data/a.jsonl, b: data/b.jsonl }",
        "{ sources: [{ jsonl: { input: a } }, { jsonl: { input: b } }], eval_ratio: 0 }",
    );
    sandbox.write(
        "data/a.jsonl",
        "{\"text\": \"Hello   World\"}\n{\"text\": \"Ünïcode TEXT\"}\n{\"text\": \"hello world\"}\n",
    );
    sandbox.write(
        "data/b.jsonl",
        "{\"text\": \"HELLO\\nworld \"}\n{\"text\": \"ünïcode text\"}\n{\"text\": \"hello worlds\"}\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(
        texts(&sandbox),
        BTreeSet::from(["Hello   World", "Ünïcode TEXT", "hello worlds"].map(String::from)),
        "the first of each group of duplicates is kept"
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["dropped"]["duplicate"], 3);
    assert_eq!(stats["per_source"][1]["dropped"]["duplicate"], 2);

    sandbox.write(
        "p.yaml",
        &pipeline(1, "{ a: data/a.jsonl, b: data/b.jsonl }", "{ sources: [{ jsonl: { input: a } }, { jsonl: { input: b } }], eval_ratio: 0, dedup: false }"),
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(corpus(&sandbox).len(), 6);
}

fn numbered_docs(range: std::ops::Range<usize>) -> String {
    range
        .map(|i| {
            format!(
                "{}\n",
                json!({"text": format!("document number {i} with some text")})
            )
        })
        .collect()
}

#[test]
fn max_docs_keeps_exactly_that_many_deterministically_in_original_order() {
    let sandbox = sandbox_with(
        "{ web: data/w.jsonl }",
        "{ source: { jsonl: { input: web } }, max_docs: 137, eval_ratio: 0 }",
    );
    sandbox.write("data/w.jsonl", &numbered_docs(0..1000));
    sandbox.ok(&["run", "p.yaml"]);
    let first = sandbox.read("runs/latest/outputs/corpus/train.jsonl");
    let kept = lines(&sandbox, "train.jsonl");
    assert_eq!(kept.len(), 137);
    let numbers: Vec<usize> = kept
        .iter()
        .map(|r| {
            r["text"]
                .as_str()
                .unwrap()
                .split(' ')
                .nth(2)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "original order");
    assert!(
        numbers.last().unwrap() - numbers[0] > 500,
        "a sample, not a prefix"
    );
    let stats = stats(&sandbox);
    assert_eq!(stats["dropped"]["sampled_out"], 1000 - 137);
    assert_counts_add_up(&stats);

    // Same seed elsewhere: the same sample. Another seed: another sample.
    let again = sandbox_with(
        "{ web: data/w.jsonl }",
        "{ source: { jsonl: { input: web } }, max_docs: 137, eval_ratio: 0 }",
    );
    again.write("data/w.jsonl", &numbered_docs(0..1000));
    again.ok(&["run", "p.yaml"]);
    assert_eq!(again.read("runs/latest/outputs/corpus/train.jsonl"), first);
    again.write(
        "p.yaml",
        &pipeline(
            2,
            "{ web: data/w.jsonl }",
            "{ source: { jsonl: { input: web } }, max_docs: 137, eval_ratio: 0 }",
        ),
    );
    again.ok(&["run", "p.yaml"]);
    assert_ne!(again.read("runs/latest/outputs/corpus/train.jsonl"), first);
    assert_eq!(lines(&again, "train.jsonl").len(), 137);

    // More than there are: everything.
    again.write(
        "p.yaml",
        &pipeline(
            2,
            "{ web: data/w.jsonl }",
            "{ source: { jsonl: { input: web } }, max_docs: 5000 }",
        ),
    );
    again.ok(&["run", "p.yaml"]);
    assert_eq!(corpus(&again).len(), 1000);
}

// ---- split ----

#[test]
fn split_is_deterministic_and_adding_documents_never_moves_existing_ones() {
    let with = "{ source: { jsonl: { input: web } }, eval_ratio: 0.2 }";
    let sandbox = sandbox_with("{ web: data/w.jsonl }", with);
    sandbox.write("data/w.jsonl", &numbered_docs(0..500));
    sandbox.ok(&["run", "p.yaml"]);
    let eval_before = line_set(&sandbox, "eval.jsonl");
    let train_before = line_set(&sandbox, "train.jsonl");
    assert!(
        (70..130).contains(&eval_before.len()),
        "{}",
        eval_before.len()
    );

    let twin = sandbox_with("{ web: data/w.jsonl }", with);
    twin.write("data/w.jsonl", &numbered_docs(0..500));
    twin.ok(&["run", "p.yaml"]);
    assert_eq!(
        twin.read("runs/latest/outputs/corpus/eval.jsonl"),
        sandbox.read("runs/latest/outputs/corpus/eval.jsonl")
    );

    // New documents before, between and after the old ones.
    let mut grown = numbered_docs(1000..1200);
    grown.push_str(&numbered_docs(0..500));
    grown.push_str(&numbered_docs(500..900));
    sandbox.write("data/w.jsonl", &grown);
    sandbox.ok(&["run", "p.yaml"]);
    let eval_after = line_set(&sandbox, "eval.jsonl");
    let train_after = line_set(&sandbox, "train.jsonl");
    assert!(eval_before.is_subset(&eval_after));
    assert!(train_before.is_subset(&train_after));
    assert!(eval_after.len() > eval_before.len());
}

// ---- caching ----

#[test]
fn rerun_is_cached_and_editing_one_input_file_reruns_ingest() {
    let sandbox = sandbox_with(
        "{ notes: data/notes, web: data/w.jsonl }",
        "{ sources: [{ files: { input: notes } }, { jsonl: { input: web } }] }",
    );
    sandbox.write("data/notes/a.md", "note a");
    sandbox.write("data/notes/sub/b.md", "note b");
    sandbox.write("data/w.jsonl", "{\"text\": \"web\"}\n");
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["corpus"]);
    sandbox.ok(&["run", "p.yaml"]);
    assert!(
        sandbox.executed().is_empty(),
        "{:?}",
        sandbox.latest_statuses()
    );

    sandbox.write("data/notes/sub/b.md", "note b, edited");
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.executed(), ["corpus"]);
    assert!(texts(&sandbox).contains("note b, edited"));
    sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty());
}
