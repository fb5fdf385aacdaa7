//! Parquet: one string column of a Parquet file (the format Hugging Face datasets ship
//! in), one document per row. The file is read row group by row group and, within one,
//! in batches of [`BATCH_ROWS`] values, so memory is bounded by a page and a batch, not by
//! the file. No Arrow: the column is decoded with the `parquet` crate's column readers.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::{Document, Location, Position, Problem, SourceError};
use crate::data::records::TextRecord;

/// Rows decoded at once.
pub const BATCH_ROWS: usize = 1024;

/// Reads one top-level string column of a Parquet file.
pub struct ParquetReader {
    path: PathBuf,
    file: SerializedFileReader<File>,
    column: String,
    column_index: usize,
    max_def_level: i16,
    row_group: usize,
    reader: Option<ColumnReaderImpl<ByteArrayType>>,
    /// The current batch: its definition levels (one per row) and non-null values.
    levels: Vec<i16>,
    values: Vec<ByteArray>,
    /// Next row of the batch, and next value.
    level_at: usize,
    value_at: usize,
    rows_in_batch: usize,
    /// Row number (0-based, across row groups) of the next row.
    row: u64,
}

impl ParquetReader {
    /// Opens `path` and finds `column`; a missing or non-string column is an error that
    /// lists the file's columns.
    pub fn open(path: &Path, column: &str) -> Result<ParquetReader, SourceError> {
        let handle = File::open(path).map_err(|error| SourceError::io(path, error))?;
        let file = SerializedFileReader::new(handle).map_err(|error| {
            SourceError::unreadable(path, format!("not a readable Parquet file: {error}"))
        })?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();
        let top_level: Vec<String> = schema
            .root_schema()
            .get_fields()
            .iter()
            .map(|field| field.name().to_string())
            .collect();
        let Some((column_index, descriptor)) = schema
            .columns()
            .iter()
            .enumerate()
            .find(|(_, descriptor)| descriptor.path().parts() == [column])
        else {
            let message = if top_level.iter().any(|name| name == column) {
                format!(
                    "column {column:?} is nested (a list or struct); only a top-level string column can be read"
                )
            } else {
                format!(
                    "no column {column:?}; the file has columns: {}",
                    top_level.join(", ")
                )
            };
            return Err(SourceError::unreadable(path, message));
        };
        if descriptor.physical_type() != PhysicalType::BYTE_ARRAY {
            return Err(SourceError::unreadable(
                path,
                format!(
                    "column {column:?} holds {} values, not strings",
                    descriptor.physical_type()
                ),
            ));
        }
        Ok(ParquetReader {
            path: path.to_path_buf(),
            max_def_level: descriptor.max_def_level(),
            file,
            column: column.to_string(),
            column_index,
            row_group: 0,
            reader: None,
            levels: Vec::with_capacity(BATCH_ROWS),
            values: Vec::with_capacity(BATCH_ROWS),
            level_at: 0,
            value_at: 0,
            rows_in_batch: 0,
            row: 0,
        })
    }

    fn corrupt(&self, error: parquet::errors::ParquetError) -> SourceError {
        SourceError::unreadable(
            &self.path,
            format!(
                "reading column {:?} of row group {}: {error}",
                self.column, self.row_group
            ),
        )
    }

    /// Decodes the next batch; `false` at the end of the file.
    fn fill(&mut self) -> Result<bool, SourceError> {
        loop {
            if self.reader.is_none() {
                if self.row_group >= self.file.num_row_groups() {
                    return Ok(false);
                }
                let group = self
                    .file
                    .get_row_group(self.row_group)
                    .map_err(|error| self.corrupt(error))?;
                let reader = group
                    .get_column_reader(self.column_index)
                    .map_err(|error| self.corrupt(error))?;
                let ColumnReader::ByteArrayColumnReader(reader) = reader else {
                    return Err(SourceError::unreadable(
                        &self.path,
                        format!("column {:?} is not a string column", self.column),
                    ));
                };
                self.reader = Some(reader);
            }
            self.levels.clear();
            self.values.clear();
            let read = match &mut self.reader {
                Some(reader) => {
                    reader.read_records(BATCH_ROWS, Some(&mut self.levels), None, &mut self.values)
                }
                None => continue,
            };
            let (rows, _, _) = read.map_err(|error| self.corrupt(error))?;
            if rows == 0 {
                self.reader = None;
                self.row_group += 1;
                continue;
            }
            self.rows_in_batch = rows;
            self.level_at = 0;
            self.value_at = 0;
            return Ok(true);
        }
    }
}

impl Iterator for ParquetReader {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.level_at >= self.rows_in_batch {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(error) => return Some(Err(error)),
            }
        }
        let row = self.row;
        self.row += 1;
        let is_null = self.max_def_level > 0
            && self
                .levels
                .get(self.level_at)
                .is_some_and(|&level| level < self.max_def_level);
        self.level_at += 1;
        let location = || Location::new(&self.path, Position::Row(row));
        if is_null {
            let problem = Problem::Null {
                column: self.column.clone(),
            };
            return Some(Err(SourceError::record(location(), problem)));
        }
        let Some(value) = self.values.get(self.value_at) else {
            return Some(Err(SourceError::unreadable(
                &self.path,
                format!("column {:?}: fewer values than rows", self.column),
            )));
        };
        self.value_at += 1;
        Some(match std::str::from_utf8(value.data()) {
            Ok(text) => Ok(Document::Text(TextRecord {
                text: text.to_string(),
                source_url: None,
                chunk_id: None,
                section_path: None,
            })),
            Err(error) => Err(SourceError::record(
                location(),
                Problem::InvalidUtf8 {
                    offset: error.valid_up_to(),
                },
            )),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    use parquet::basic::{Compression, LogicalType, Repetition};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;

    /// Writes `rows` (None = null) as an optional string column `text` plus an int64 `id`,
    /// in row groups of `group_rows`.
    pub(crate) fn write_fixture(path: &Path, rows: &[Option<&str>], group_rows: usize) {
        let text = Type::primitive_type_builder("text", PhysicalType::BYTE_ARRAY)
            .with_repetition(Repetition::OPTIONAL)
            .with_logical_type(Some(LogicalType::String))
            .build()
            .unwrap();
        let id = Type::primitive_type_builder("id", PhysicalType::INT64)
            .with_repetition(Repetition::REQUIRED)
            .build()
            .unwrap();
        let schema = Type::group_type_builder("schema")
            .with_fields(vec![Arc::new(text), Arc::new(id)])
            .build()
            .unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = File::create(path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
        for (group, chunk) in rows.chunks(group_rows.max(1)).enumerate() {
            let mut row_group = writer.next_row_group().unwrap();
            let values: Vec<ByteArray> = chunk
                .iter()
                .flatten()
                .map(|text| ByteArray::from(*text))
                .collect();
            let levels: Vec<i16> = chunk.iter().map(|row| i16::from(row.is_some())).collect();
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
                .typed::<parquet::data_type::Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            column.close().unwrap();
            row_group.close().unwrap();
        }
        writer.close().unwrap();
    }

    fn texts(path: &Path, column: &str) -> Vec<Result<String, String>> {
        ParquetReader::open(path, column)
            .unwrap()
            .map(|item| match item {
                Ok(Document::Text(record)) => Ok(record.text),
                Ok(Document::Chat(_)) => panic!("chat"),
                Err(error) => Err(error.to_string()),
            })
            .collect()
    }

    #[test]
    fn reads_a_column_across_row_groups_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let owned: Vec<String> = (0..3000).map(|i| format!("row {i}")).collect();
        let rows: Vec<Option<&str>> = owned.iter().map(|s| Some(s.as_str())).collect();
        write_fixture(&path, &rows, 1100);
        let read = texts(&path, "text");
        assert_eq!(read.len(), 3000);
        assert_eq!(read[0], Ok("row 0".to_string()));
        assert_eq!(read[2999], Ok("row 2999".to_string()));
        assert!(read.iter().all(Result::is_ok));
    }

    #[test]
    fn nulls_are_bad_records_with_their_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_fixture(&path, &[Some("a"), None, Some("c")], 10);
        let read = texts(&path, "text");
        assert_eq!(read[0], Ok("a".to_string()));
        let error = read[1].as_ref().unwrap_err();
        assert!(
            error.ends_with("t.parquet: row 1: column \"text\" is null"),
            "{error}"
        );
        assert_eq!(read[2], Ok("c".to_string()));
    }

    #[test]
    fn missing_or_non_string_columns_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_fixture(&path, &[Some("a")], 10);
        let missing = ParquetReader::open(&path, "content")
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.ends_with("t.parquet: no column \"content\"; the file has columns: text, id"),
            "{missing}"
        );
        let wrong = ParquetReader::open(&path, "id").err().unwrap().to_string();
        assert!(
            wrong.contains("column \"id\" holds INT64 values, not strings"),
            "{wrong}"
        );
    }
}
