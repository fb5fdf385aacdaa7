//! The built-in `synthetic` data source: a seeded, invented world of towns and people with
//! ground truth, rendered as pretraining documents, SFT chat conversations and a held-out
//! question set with exact answers. Every name is made from syllables and every sentence from
//! the templates in this file, so no text is copied from anywhere.
//!
//! Held-out design (what evaluation relies on):
//! - Each attribute has three template sets: `state` (documents), `ask` (SFT questions) and
//!   `held_out` (paraphrased evaluation questions). `ask` and `held_out` never overlap.
//! - Each entity has exactly one held-out fact. Documents state it; SFT conversations never
//!   ask about it; the question set asks only held-out facts: first each one once with a
//!   familiar (`ask`) phrasing, then with the paraphrases. A model that learned the facts
//!   in pretraining and, in SFT, how a question maps to the fact it asks can answer the
//!   familiar ones; the paraphrases also test whether it understood the question.
//!
//! Determinism: the world is built from (seed, settings); document, conversation and question
//! `i` are each rebuilt from (seed, stream, i) alone, so output is byte-identical across runs
//! and platforms, any item can be made without the ones before it, and memory does not grow
//! with `documents`.

use std::collections::HashSet;

use schemars::JsonSchema;

use crate::data::records::{ChatMessage, ChatRecord, Role};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Settings of the synthetic source (`source: { synthetic: { ... } }`); the seed comes separately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSettings {
    /// Number of pretraining documents.
    pub documents: u64,
    /// Number of entities (towns and people). Default: `documents / 100`, clamped to
    /// 16..=100000, so each fact is stated about 30 times. Every fact is stated at least once
    /// when `documents >= 2 * entities` (with `facts_per_document >= 3`).
    pub entities: Option<u32>,
    /// Facts stated per document (at most the entity's number of attributes).
    pub facts_per_document: u32,
    /// Number of SFT chat conversations.
    pub conversations: u64,
    /// Number of held-out questions; capped at (held-out facts x held-out phrasings).
    pub questions: u64,
    /// How SFT conversations answer: with a sentence stating the fact, or the bare answer.
    pub answers: AnswerStyle,
}

/// How the assistant answers in synthetic SFT conversations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnswerStyle {
    /// A sentence stating the fact ("Tarin Oskel plays the lute."), phrased like the
    /// documents. This is what lets a small model answer held-out questions: it learns to
    /// recite what pretraining stored, rather than to pull out a bare word.
    #[default]
    Sentence,
    /// The bare answer ("lute").
    Bare,
}

impl Default for SyntheticSettings {
    fn default() -> Self {
        SyntheticSettings {
            documents: 20_000,
            entities: None,
            facts_per_document: 3,
            conversations: 2_000,
            questions: 200,
            answers: AnswerStyle::Sentence,
        }
    }
}

impl SyntheticSettings {
    /// The number of entities: `entities` if set, else scaled from `documents`.
    pub fn entity_count(&self) -> u32 {
        self.entities
            .unwrap_or_else(|| (self.documents / 100).clamp(16, 100_000) as u32)
    }
}

/// Why the settings cannot build a world.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    /// `entities` (given or derived from `documents`) is out of range.
    #[error("`entities` must be between 4 and 1000000, got {0}")]
    Entities(usize),
    /// `facts_per_document` is zero.
    #[error("`facts_per_document` must be at least 1")]
    FactsPerDocument,
}

/// What an entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A town: river, founder, founding year, main export, nearest town.
    Town,
    /// A person: home town, profession, instrument, favourite colour.
    Person,
}

/// One attribute of an entity; each has a short (1-3 word) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    /// Town: the river it lies on (an invented name).
    River,
    /// Town: who founded it (an invented full name).
    Founder,
    /// Town: the year it was founded.
    Founded,
    /// Town: its main export.
    Export,
    /// Town: the nearest town.
    Neighbour,
    /// Person: the town they live in.
    Home,
    /// Person: their profession.
    Profession,
    /// Person: the instrument they play.
    Instrument,
    /// Person: their favourite colour.
    Colour,
}

/// One ground-truth fact about an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// Which attribute this is.
    pub attribute: Attribute,
    /// The exact answer.
    pub answer: String,
    /// True for the one fact per entity that SFT never asks and the question set does.
    pub held_out: bool,
}

/// A town or a person with its facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// Town or person.
    pub kind: Kind,
    /// Unique invented name ("Ardelwick", "Tarin Oskel").
    pub name: String,
    /// The entity's facts, one per attribute of its kind.
    pub facts: Vec<Fact>,
}

/// The whole invented world: entities and their facts, built from (seed, settings). Its size
/// grows with `entities` only; documents, conversations and questions are made on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// The seed everything is derived from.
    pub seed: u64,
    /// The settings the world was built with.
    pub settings: SyntheticSettings,
    /// All entities: towns first, then people.
    pub entities: Vec<Entity>,
    /// Held-out facts as (entity index, fact index), in a seeded shuffled order.
    held_out: Vec<(usize, usize)>,
}

/// A pretraining document with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The document text (a few sentences about one entity).
    pub text: String,
    /// Where it is "from": `synthetic://town/Ardelwick`, `synthetic://person/Tarin-Oskel`.
    pub source_url: String,
    /// Ordinal of this document among the documents about the same entity.
    pub chunk_id: u64,
}

/// A held-out evaluation question with its exact answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The question text.
    pub question: String,
    /// The exact expected answer.
    pub answer: String,
    /// The name of the entity asked about.
    pub entity: String,
    /// The attribute asked about.
    pub attribute: Attribute,
    /// Whether SFT used this phrasing (for other facts) or it is a paraphrase.
    pub category: QuestionCategory,
}

/// How a held-out question is phrased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuestionCategory {
    /// A phrasing SFT conversations use for other facts.
    Familiar,
    /// A phrasing no SFT conversation uses.
    Paraphrased,
}

impl QuestionCategory {
    /// The category's name in `questions.jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            QuestionCategory::Familiar => "familiar",
            QuestionCategory::Paraphrased => "paraphrased",
        }
    }
}

/// The phrasings of one attribute. `{e}` is the entity name, `{a}` the answer.
struct Phrasings {
    state: &'static [&'static str],
    ask: &'static [&'static str],
    held_out: &'static [&'static str],
}

#[rustfmt::skip]
fn phrasings(attribute: Attribute) -> Phrasings {
    use Attribute::*;
    let (state, ask, held_out): (&[&str], &[&str], &[&str]) = match attribute {
        River => (
            &["The river {a} flows through {e}.", "{e} was built beside the river {a}.",
              "Boats on the river {a} stop at {e}.", "In {e}, the river {a} is never far away.",
              "The town of {e} lies on the river {a}."],
            &["Which river flows through {e}?", "What river runs through the town of {e}?",
              "On which river does {e} lie?"],
            &["Name the river that passes {e}.", "{e} stands on what river?"],
        ),
        Founder => (
            &["{e} was founded by {a}.", "{a} founded the town of {e}.",
              "The founder of {e} was {a}.", "Long ago, {a} laid the first stones of {e}.",
              "People in {e} still honour {a}, who founded the town."],
            &["Who founded {e}?", "Who was the founder of {e}?",
              "Which person founded the town of {e}?"],
            &["Tell me the name of the person who established {e}.",
              "{e} owes its founding to whom?"],
        ),
        Founded => (
            &["{e} was founded in {a}.", "The town of {e} dates from the year {a}.",
              "In {a}, the first houses of {e} were built.", "{e} has stood since {a}."],
            &["When was {e} founded?", "In what year was {e} founded?",
              "What year was the town of {e} built?"],
            &["Give the founding year of {e}.", "{e} first appeared in which year?"],
        ),
        Export => (
            &["{e} is known for its {a}.", "The main export of {e} is {a}.",
              "Merchants travel to {e} to buy {a}.",
              "Most of the {a} in the region comes from {e}."],
            &["What is the main export of {e}?", "What does {e} export?",
              "What is {e} known for selling?"],
            &["Which good does {e} mostly trade away?", "{e} is famous for producing what?"],
        ),
        Neighbour => (
            &["The nearest town to {e} is {a}.", "From {e}, it is a short walk to {a}.",
              "{a} is the closest neighbour of {e}.",
              "Travellers leaving {e} usually reach {a} first."],
            &["Which town is nearest to {e}?", "What is the closest town to {e}?",
              "What town neighbours {e}?"],
            &["If you leave {e}, which town do you come to first?",
              "Name the town closest to {e}."],
        ),
        Home => (
            &["{e} lives in {a}.", "{e} makes a home in the town of {a}.",
              "The town of {a} is where {e} lives.", "You can find {e} in {a}."],
            &["Where does {e} live?", "In which town does {e} live?",
              "What town is home to {e}?"],
            &["{e} resides in which town?", "Name the home town of {e}."],
        ),
        Profession => (
            &["{e} works as a {a}.", "By trade, {e} is a {a}.",
              "{e} has been a {a} for many years.", "Everyone knows {e} as the local {a}."],
            &["What is {e}'s profession?", "What does {e} do for a living?",
              "What job does {e} have?"],
            &["{e} earns money doing what work?", "Which trade does {e} practise?"],
        ),
        Instrument => (
            &["{e} plays the {a}.", "In the evenings, {e} practises the {a}.",
              "{e} is a skilled player of the {a}.", "The sound of {e}'s {a} is well known."],
            &["What instrument does {e} play?", "Which instrument is {e} known for playing?",
              "What musical instrument does {e} play?"],
            &["{e} is able to play which instrument?", "Name the instrument {e} performs on."],
        ),
        Colour => (
            &["{e}'s favourite colour is {a}.", "{e} likes {a} more than any other colour.",
              "{e} always wears something {a}.",
              "Ask {e} and you will hear that {a} is the best colour."],
            &["What is {e}'s favourite colour?", "Which colour does {e} like best?",
              "What colour does {e} prefer?"],
            &["{e} loves which colour most?", "Name the colour {e} is fondest of."],
        ),
    };
    Phrasings { state, ask, held_out }
}

#[rustfmt::skip]
const TOWN_INTROS: &[&str] = &["{e} is a small town.", "{e} is an old market town.",
    "This page is about the town of {e}.", ""];
#[rustfmt::skip]
const PERSON_INTROS: &[&str] = &["{e} is known to many people.", "This page is about {e}.", ""];
#[rustfmt::skip]
const SYSTEM_PROMPTS: &[&str] = &["Answer questions about the towns and people of the valley. \
    Reply with the answer only.", "Answer briefly."];
#[rustfmt::skip]
const EXPORTS: &[&str] = &["wool", "salt", "copper", "glass", "honey", "timber", "cheese",
    "iron", "silk", "pottery", "rope", "amber", "tin", "barley", "cider", "leather", "dried fish",
    "olive oil", "paper", "candles"];
#[rustfmt::skip]
const PROFESSIONS: &[&str] = &["baker", "smith", "weaver", "potter", "miller", "tanner",
    "fisher", "carpenter", "mason", "cooper", "brewer", "shepherd", "tailor", "cartographer",
    "beekeeper", "ferryman", "lamplighter", "glassblower", "scribe", "healer"];
#[rustfmt::skip]
const INSTRUMENTS: &[&str] = &["lute", "fiddle", "drum", "flute", "harp", "horn", "zither",
    "lyre", "bagpipes", "dulcimer", "mandolin", "trumpet"];
#[rustfmt::skip]
const COLOURS: &[&str] = &["red", "blue", "green", "yellow", "purple", "orange", "grey",
    "white", "black", "brown", "teal", "crimson"];
/// Names are (onset vowel)+ coda, e.g. "Taren", "Vodris"; repeats weight the plainer letters.
#[rustfmt::skip]
const ONSETS: &[&str] = &["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t",
    "v", "z", "br", "dr", "gr", "th", "st", "tr"];
#[rustfmt::skip]
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou"];
#[rustfmt::skip]
const CODAS: &[&str] = &["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "ris", "wen"];
#[rustfmt::skip]
const TOWN_ENDINGS: &[&str] = &["", "", "", "ford", "holm", "by", "wick", "stead", "mere"];

/// Held-out phrasings per attribute (the same for all, so questions cycle evenly).
const HELD_OUT_PHRASINGS: usize = 2;

/// Stream tags: each kind of output draws from its own independent random stream.
const WORLD: u64 = 1;
const DOCUMENTS: u64 = 2;
const CONVERSATIONS: u64 = 3;

fn fill(template: &str, entity: &str, answer: &str) -> String {
    template.replace("{e}", entity).replace("{a}", answer)
}

/// An invented capitalised word (two open syllables, a third one time in four, then a coda
/// and an optional ending) that `used` does not hold yet.
fn invent_word(rng: &mut Rng, used: &mut HashSet<String>, endings: &[&str]) -> String {
    loop {
        let mut word = String::new();
        for _ in 0..2 + usize::from(rng.index(4) == 0) {
            word.push_str(rng.pick(ONSETS));
            word.push_str(rng.pick(VOWELS));
        }
        word.push_str(rng.pick(CODAS));
        word.push_str(rng.pick(endings));
        word[..1].make_ascii_uppercase();
        // No name may read as an answer word ("Baker", "Lute", "Paper").
        let vocabulary = [EXPORTS, PROFESSIONS, INSTRUMENTS, COLOURS];
        let is_answer_word = vocabulary
            .iter()
            .flat_map(|v| v.iter())
            .any(|w| w.eq_ignore_ascii_case(&word));
        if word.len() >= 4 && !is_answer_word && used.insert(word.clone()) {
            return word;
        }
    }
}

fn invent_person(rng: &mut Rng, used: &mut HashSet<String>) -> String {
    let first = invent_word(rng, used, &[""]);
    format!("{first} {}", invent_word(rng, used, &[""]))
}

fn fact(attribute: Attribute, answer: String) -> Fact {
    Fact {
        attribute,
        answer,
        held_out: false,
    }
}

impl World {
    /// Builds the world for `seed` and `settings`; errors if the settings cannot make one.
    pub fn new(seed: u64, settings: &SyntheticSettings) -> Result<World, WorldError> {
        let n = settings.entity_count() as usize;
        if !(4..=1_000_000).contains(&n) {
            return Err(WorldError::Entities(n));
        }
        if settings.facts_per_document == 0 {
            return Err(WorldError::FactsPerDocument);
        }
        let mut rng = Rng::for_item(seed, WORLD, 0);
        // Every invented word (town, river, first name, surname) is unique in the world.
        let mut used = HashSet::new();
        let towns = (n / 3).max(2);
        let town_names: Vec<String> = (0..towns)
            .map(|_| invent_word(&mut rng, &mut used, TOWN_ENDINGS))
            .collect();
        // Nearest towns: shuffled pairs are each other's nearest; an odd one out points into a pair.
        let mut order: Vec<usize> = (0..towns).collect();
        rng.shuffle(&mut order);
        let mut nearest = vec![0; towns];
        for pair in order.chunks(2) {
            match *pair {
                [a, b] => (nearest[a], nearest[b]) = (b, a),
                [a] => nearest[a] = order[0],
                _ => unreachable!(),
            }
        }
        let mut entities = Vec::with_capacity(n);
        for (t, name) in town_names.iter().enumerate() {
            let facts = vec![
                fact(Attribute::River, invent_word(&mut rng, &mut used, &[""])),
                fact(Attribute::Founder, invent_person(&mut rng, &mut used)),
                fact(Attribute::Founded, (1000 + rng.index(900)).to_string()),
                fact(Attribute::Export, rng.pick(EXPORTS).to_string()),
                fact(Attribute::Neighbour, town_names[nearest[t]].clone()),
            ];
            entities.push(Entity {
                kind: Kind::Town,
                name: name.clone(),
                facts,
            });
        }
        for _ in towns..n {
            let name = invent_person(&mut rng, &mut used);
            let facts = vec![
                fact(Attribute::Home, town_names[rng.index(towns)].clone()),
                fact(Attribute::Profession, rng.pick(PROFESSIONS).to_string()),
                fact(Attribute::Instrument, rng.pick(INSTRUMENTS).to_string()),
                fact(Attribute::Colour, rng.pick(COLOURS).to_string()),
            ];
            entities.push(Entity {
                kind: Kind::Person,
                name,
                facts,
            });
        }
        let mut held_out = Vec::with_capacity(n);
        for (e, entity) in entities.iter_mut().enumerate() {
            let f = rng.index(entity.facts.len());
            entity.facts[f].held_out = true;
            held_out.push((e, f));
        }
        rng.shuffle(&mut held_out);
        Ok(World {
            seed,
            settings: settings.clone(),
            entities,
            held_out,
        })
    }

    /// Pretraining document `index`: entity `index % entities`, stating `facts_per_document`
    /// of its facts. Successive documents about one entity rotate through its facts, so each
    /// fact is stated within the first `ceil(attributes / facts_per_document)` rounds.
    pub fn document(&self, index: u64) -> Document {
        let n = self.entities.len() as u64;
        let (e, round) = ((index % n) as usize, index / n);
        let entity = &self.entities[e];
        let mut rng = Rng::for_item(self.seed, DOCUMENTS, index);
        let len = entity.facts.len();
        let k = (self.settings.facts_per_document as usize).min(len);
        let start = (round % len as u64) as usize * k + e;
        let mut facts: Vec<&Fact> = (0..k).map(|j| &entity.facts[(start + j) % len]).collect();
        rng.shuffle(&mut facts);
        let (intros, kind) = match entity.kind {
            Kind::Town => (TOWN_INTROS, "town"),
            Kind::Person => (PERSON_INTROS, "person"),
        };
        let mut sentences = vec![fill(rng.pick(intros), &entity.name, "")];
        for f in facts {
            sentences.push(fill(
                rng.pick(phrasings(f.attribute).state),
                &entity.name,
                &f.answer,
            ));
        }
        sentences.retain(|s| !s.is_empty());
        Document {
            text: sentences.join(" "),
            source_url: format!("synthetic://{kind}/{}", entity.name.replace(' ', "-")),
            chunk_id: round,
        }
    }

    /// SFT conversation `index`: one to three questions about one random entity, never
    /// about a held-out fact, always with `ask` phrasings, each answered with a sentence
    /// stating the fact (or the bare answer, by `answers`).
    pub fn conversation(&self, index: u64) -> ChatRecord {
        let mut rng = Rng::for_item(self.seed, CONVERSATIONS, index);
        let entity = &self.entities[rng.index(self.entities.len())];
        let mut askable: Vec<&Fact> = entity.facts.iter().filter(|f| !f.held_out).collect();
        rng.shuffle(&mut askable);
        let turns = [1, 1, 1, 2, 3][rng.index(5)];
        let mut messages = Vec::new();
        if rng.index(2) == 0 {
            let content = rng.pick(SYSTEM_PROMPTS).to_string();
            messages.push(ChatMessage {
                role: Role::System,
                content,
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
        }
        for f in askable.into_iter().take(turns) {
            let question = fill(rng.pick(phrasings(f.attribute).ask), &entity.name, "");
            messages.push(ChatMessage {
                role: Role::User,
                content: question,
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
            let content = match self.settings.answers {
                AnswerStyle::Sentence => fill(
                    rng.pick(phrasings(f.attribute).state),
                    &entity.name,
                    &f.answer,
                ),
                AnswerStyle::Bare => f.answer.clone(),
            };
            messages.push(ChatMessage {
                role: Role::Assistant,
                content,
                tool_calls: Vec::new(),
                extra: Default::default(),
            });
        }
        ChatRecord {
            messages,
            tools: None,
            source_url: None,
        }
    }

    /// How many questions [`questions`] yields: `settings.questions`, capped so none repeats.
    pub fn question_count(&self) -> u64 {
        self.settings
            .questions
            .min((self.held_out.len() * (1 + HELD_OUT_PHRASINGS)) as u64)
    }

    /// Held-out question `index`: held-out fact `index % facts`, asked in the first pass over
    /// the facts with a familiar (`ask`) phrasing, in later passes with a paraphrase.
    pub fn question(&self, index: u64) -> Question {
        let n = self.held_out.len() as u64;
        let (e, f) = self.held_out[(index % n) as usize];
        let (entity, fact) = (&self.entities[e], &self.entities[e].facts[f]);
        let pass = index / n;
        let phrasings = phrasings(fact.attribute);
        let (templates, turn, category) = match pass {
            0 => (phrasings.ask, e as u64, QuestionCategory::Familiar),
            _ => (
                phrasings.held_out,
                pass - 1 + e as u64,
                QuestionCategory::Paraphrased,
            ),
        };
        Question {
            question: fill(templates[turn as usize % templates.len()], &entity.name, ""),
            answer: fact.answer.clone(),
            entity: entity.name.clone(),
            attribute: fact.attribute,
            category,
        }
    }
}

/// A lazy iterator over items `range` of one of the world's streams. It holds no items, so
/// memory stays flat for any count, and `nth`/`skip` jump without generating what they skip.
pub struct Items<'a, T> {
    world: &'a World,
    range: std::ops::Range<u64>,
    make: fn(&World, u64) -> T,
}

impl<T> Iterator for Items<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.range.next().map(|i| (self.make)(self.world, i))
    }

    fn nth(&mut self, n: usize) -> Option<T> {
        self.range.nth(n).map(|i| (self.make)(self.world, i))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.range.size_hint()
    }
}

/// All `settings.documents` pretraining documents, generated lazily.
pub fn pretrain_documents(world: &World) -> Items<'_, Document> {
    let range = 0..world.settings.documents;
    Items {
        world,
        range,
        make: World::document,
    }
}

/// All `settings.conversations` SFT conversations, generated lazily.
pub fn conversations(world: &World) -> Items<'_, ChatRecord> {
    let range = 0..world.settings.conversations;
    Items {
        world,
        range,
        make: World::conversation,
    }
}

/// The held-out question set ([`World::question_count`] questions), generated lazily.
pub fn questions(world: &World) -> Items<'_, Question> {
    let range = 0..world.question_count();
    Items {
        world,
        range,
        make: World::question,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ALL: [Attribute; 9] = [
        Attribute::River,
        Attribute::Founder,
        Attribute::Founded,
        Attribute::Export,
        Attribute::Neighbour,
        Attribute::Home,
        Attribute::Profession,
        Attribute::Instrument,
        Attribute::Colour,
    ];

    fn small(seed: u64) -> World {
        let mut settings = SyntheticSettings::default();
        (
            settings.documents,
            settings.entities,
            settings.conversations,
        ) = (600, Some(60), 3_000);
        World::new(seed, &settings).unwrap()
    }

    fn jsonl<T: Serialize>(items: impl Iterator<Item = T>) -> String {
        items
            .map(|x| serde_json::to_string(&x).unwrap() + "\n")
            .collect()
    }

    /// `name` occurs in `text` as a whole name, not inside a longer word.
    fn mentions(text: &str, name: &str) -> bool {
        text.match_indices(name).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + name.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        })
    }

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // First outputs of Vigna's splitmix64.c seeded with 1234567.
        let mut rng = Rng::from_state(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        assert_eq!(rng.next_u64(), 9817491932198370423);
    }

    #[test]
    fn same_seed_is_byte_identical_and_other_seeds_differ() {
        let (a, b, c) = (small(7), small(7), small(8));
        assert_eq!(a, b);
        assert_eq!(jsonl(pretrain_documents(&a)), jsonl(pretrain_documents(&b)));
        assert_eq!(jsonl(conversations(&a)), jsonl(conversations(&b)));
        assert_eq!(jsonl(questions(&a)), jsonl(questions(&b)));
        assert_ne!(a.entities, c.entities);
        assert_ne!(jsonl(pretrain_documents(&a)), jsonl(pretrain_documents(&c)));
        assert_ne!(jsonl(conversations(&a)), jsonl(conversations(&c)));
    }

    #[test]
    fn output_is_pinned_across_platforms_and_versions() {
        // Changing this hash changes every synthetic corpus: bump the ingest stage's
        // implementation version with it so old fingerprints are not reused.
        let world = World::new(42, &SyntheticSettings::default()).unwrap();
        let text = jsonl(pretrain_documents(&world).skip(19_950))
            + &jsonl(conversations(&world).take(50))
            + &jsonl(questions(&world));
        assert_eq!(
            blake3::hash(text.as_bytes()).to_hex().as_str(),
            "f133df84bd4fb596c7d6a80879d77a9f0d57c501e692fe1a6a04c0455fd00f8c"
        );
    }

    #[test]
    fn every_fact_is_stated_in_some_document() {
        let world = small(1);
        let docs: Vec<Document> = pretrain_documents(&world).collect();
        for entity in &world.entities {
            for fact in &entity.facts {
                let stated = docs.iter().any(|d| {
                    mentions(&d.text, &entity.name)
                        && mentions(&d.text, &fact.answer)
                        && phrasings(fact.attribute)
                            .state
                            .iter()
                            .any(|t| d.text.contains(&fill(t, &entity.name, &fact.answer)))
                });
                assert!(
                    stated,
                    "{} {:?} = {} never stated",
                    entity.name, fact.attribute, fact.answer
                );
            }
        }
    }

    #[test]
    fn held_out_phrasings_never_appear_in_sft_conversations() {
        let world = small(2);
        let sft: Vec<String> = conversations(&world)
            .flat_map(|c| c.messages.into_iter().map(|m| m.content))
            .collect();
        for attribute in ALL {
            let p = phrasings(attribute);
            assert_eq!(p.held_out.len(), HELD_OUT_PHRASINGS);
            for template in p.held_out {
                assert!(!p.ask.contains(template));
                for fragment in template
                    .split("{e}")
                    .map(str::trim)
                    .filter(|f| f.len() >= 6)
                {
                    assert!(
                        sft.iter().all(|m| !m.contains(fragment)),
                        "{fragment:?} in SFT"
                    );
                }
            }
        }
        for q in questions(&world) {
            assert!(!sft.contains(&q.question), "{} asked in SFT", q.question);
        }
    }

    #[test]
    fn sft_answers_are_true_and_never_about_held_out_facts() {
        for style in [AnswerStyle::Sentence, AnswerStyle::Bare] {
            let mut world = small(3);
            world.settings.answers = style;
            let mut turns = 0;
            let mut multi_turn = 0;
            for conversation in conversations(&world) {
                let m = &conversation.messages;
                let users: Vec<usize> = (0..m.len()).filter(|&i| m[i].role == Role::User).collect();
                multi_turn += usize::from(users.len() > 1);
                for i in users {
                    assert_eq!(m[i + 1].role, Role::Assistant);
                    let (question, answer) = (&m[i].content, &m[i + 1].content);
                    let asked: Vec<&Entity> = world
                        .entities
                        .iter()
                        .filter(|e| mentions(question, &e.name))
                        .collect();
                    let facts: Vec<&Fact> = asked
                        .iter()
                        .flat_map(|e| &e.facts)
                        .filter(|f| match style {
                            AnswerStyle::Bare => &f.answer == answer,
                            AnswerStyle::Sentence => mentions(answer, &f.answer),
                        })
                        .collect();
                    assert!(!facts.is_empty(), "{question} -> {answer} is not a fact");
                    assert!(
                        facts.iter().all(|f| !f.held_out),
                        "{question} -> {answer} states a held-out fact"
                    );
                    if style == AnswerStyle::Sentence {
                        assert!(
                            asked.iter().any(|e| mentions(answer, &e.name)),
                            "{answer} does not name whom {question} asks about"
                        );
                    }
                    turns += 1;
                }
            }
            assert!(
                turns > 3_000 && multi_turn > 500,
                "{turns} turns, {multi_turn} multi-turn"
            );
        }
    }

    #[test]
    fn questions_ask_held_out_facts_with_ground_truth_answers() {
        let world = small(4);
        let by_name: HashMap<&str, &Entity> = world
            .entities
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        let qs: Vec<Question> = questions(&world).collect();
        // 60 held-out facts, each once familiar and twice paraphrased.
        assert_eq!(qs.len(), 180);
        for (index, q) in qs.iter().enumerate() {
            let expected = match index < 60 {
                true => QuestionCategory::Familiar,
                false => QuestionCategory::Paraphrased,
            };
            assert_eq!(q.category, expected, "{}", q.question);
            let phrasing = phrasings(q.attribute);
            let templates = match q.category {
                QuestionCategory::Familiar => phrasing.ask,
                QuestionCategory::Paraphrased => phrasing.held_out,
            };
            assert!(
                templates
                    .iter()
                    .any(|t| fill(t, &q.entity, "") == q.question),
                "{}",
                q.question
            );
        }
        for q in &qs {
            let fact = by_name[q.entity.as_str()]
                .facts
                .iter()
                .find(|f| f.attribute == q.attribute);
            let fact = fact.unwrap();
            assert_eq!(
                (fact.answer.as_str(), fact.held_out),
                (q.answer.as_str(), true)
            );
            assert!(mentions(&q.question, &q.entity) && !q.question.contains(&q.answer));
        }
        let unique: HashSet<&str> = qs.iter().map(|q| q.question.as_str()).collect();
        assert_eq!(unique.len(), qs.len());
    }

    #[test]
    fn million_documents_stream_lazily() {
        let settings = SyntheticSettings {
            documents: 1_000_000,
            ..Default::default()
        };
        let world = World::new(5, &settings).unwrap();
        assert_eq!(world.entities.len(), 10_000);
        let docs = pretrain_documents(&world);
        assert!(
            std::mem::size_of_val(&docs) <= 48,
            "the iterator holds no documents"
        );
        assert_eq!(docs.size_hint(), (1_000_000, Some(1_000_000)));
        let tail: Vec<Document> = pretrain_documents(&world).skip(999_998).collect();
        assert_eq!(tail, [world.document(999_998), world.document(999_999)]);
        let chars: usize = pretrain_documents(&world)
            .take(200_000)
            .map(|d| d.text.len())
            .sum();
        assert!(chars > 200_000 * 60);
    }

    #[test]
    fn all_text_is_clean_ascii_with_no_unfilled_placeholders() {
        let world = small(6);
        let texts = pretrain_documents(&world)
            .map(|d| d.text)
            .chain(conversations(&world).flat_map(|c| c.messages.into_iter().map(|m| m.content)))
            .chain(questions(&world).flat_map(|q| [q.question, q.answer]));
        for text in texts {
            assert!(
                !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic() || c == ' '),
                "{text:?}"
            );
            assert!(
                !text.contains('{') && !text.contains("  ") && text.trim() == text,
                "{text:?}"
            );
        }
    }

    #[test]
    fn entity_names_and_invented_words_are_unique() {
        let settings = SyntheticSettings {
            entities: Some(30_000),
            ..Default::default()
        };
        let world = World::new(9, &settings).unwrap();
        let mut words = HashSet::new();
        for entity in &world.entities {
            for word in entity.name.split(' ') {
                assert!(words.insert(word), "{word} reused");
            }
            assert_eq!(entity.facts.iter().filter(|f| f.held_out).count(), 1);
        }
    }

    #[test]
    fn settings_have_defaults_and_reject_unknown_keys() {
        let mut s: SyntheticSettings = serde_json::from_str(r#"{"documents": 300}"#).unwrap();
        assert_eq!((s.documents, s.entity_count(), s.questions), (300, 16, 200));
        assert!(serde_json::from_str::<SyntheticSettings>(r#"{"documets": 3}"#).is_err());
        s.entities = Some(3);
        assert_eq!(World::new(0, &s), Err(WorldError::Entities(3)));
        s.entities = None;
        s.facts_per_document = 0;
        assert_eq!(World::new(0, &s), Err(WorldError::FactsPerDocument));
    }
}
