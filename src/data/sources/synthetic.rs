//! The built-in synthetic source as a document stream: the invented world of
//! [`crate::data::synthetic`] rendered as text documents or as chat conversations, plus
//! its held-out question set. Items are generated one at a time from (seed, index).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Document, SourceError};
use crate::data::records::{QuestionRecord, TextRecord};
use crate::data::synthetic::{self, SyntheticSettings, World};

/// Which part of the synthetic world a source yields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Pretraining documents (text records with `source_url` and `chunk_id`).
    #[default]
    Documents,
    /// SFT conversations (chat records).
    Conversations,
}

/// Streams one part of a synthetic world.
pub struct SyntheticReader {
    world: World,
    part: Part,
    next: u64,
    end: u64,
}

impl SyntheticReader {
    /// Builds the world for `seed` and `settings`.
    pub fn new(
        seed: u64,
        settings: &SyntheticSettings,
        part: Part,
    ) -> Result<SyntheticReader, SourceError> {
        let world = World::new(seed, settings)?;
        let end = match part {
            Part::Documents => settings.documents,
            Part::Conversations => settings.conversations,
        };
        Ok(SyntheticReader {
            world,
            part,
            next: 0,
            end,
        })
    }

    /// The world the documents come from.
    pub fn world(&self) -> &World {
        &self.world
    }
}

impl Iterator for SyntheticReader {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(Ok(match self.part {
            Part::Documents => {
                let document = self.world.document(index);
                Document::Text(TextRecord {
                    text: document.text,
                    source_url: Some(document.source_url),
                    chunk_id: Some(document.chunk_id.to_string()),
                    section_path: None,
                })
            }
            Part::Conversations => {
                let mut record = self.world.conversation(index);
                record.source_url = Some(format!("synthetic://conversation/{index}"));
                Document::Chat(record)
            }
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.end - self.next).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// One line of `questions.jsonl`: the question and its exact answer, plus what it asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionLine {
    /// Question and answer.
    #[serde(flatten)]
    pub record: QuestionRecord,
    /// The entity asked about.
    pub entity: String,
    /// The attribute asked about.
    pub attribute: synthetic::Attribute,
}

/// The world's held-out questions, generated lazily.
pub fn questions(world: &World) -> impl Iterator<Item = QuestionLine> + '_ {
    synthetic::questions(world).map(|question| QuestionLine {
        record: QuestionRecord {
            question: question.question,
            answer: question.answer,
            // `familiar` (a phrasing SFT uses for other facts) or `paraphrased`.
            category: Some(question.category.name().to_string()),
        },
        entity: question.entity,
        attribute: question.attribute,
    })
}
