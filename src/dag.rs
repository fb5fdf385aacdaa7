//! The stage graph: which stage reads which, checked before anything runs.
//!
//! An input value is a reference to an upstream stage when its first path component
//! names a stage (`tok`, `corpus/train.jsonl`); otherwise, or when it starts with `./`,
//! `../` or `/`, it is an external file or directory, relative to the pipeline file.
//! An input `hf:org/name[@revision]` is a model in the local Hugging Face cache
//! ([`crate::hf_cache`]); it binds like an external directory (its snapshot).
//! Cycles, missing files or cached models, unknown input names and type mismatches (a
//! tokenizer where a token cache is expected) are errors naming the stages involved.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::{Component, Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::config::{Origin, ResolvedPipeline};
use crate::hf_cache::{self, HfError, Snapshot};
use crate::stages::{Artifact, InputRules, InputSlot};
use crate::suggest::did_you_mean;

/// What an input is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// A file or directory outside the store.
    External {
        /// As written in the pipeline.
        declared: String,
        /// Absolute path.
        path: PathBuf,
        /// The Hugging Face cache snapshot, when `declared` is an `hf:` id.
        hub: Option<Box<Snapshot>>,
    },
    /// The output of an upstream stage, or a path inside it.
    Stage {
        /// Index of the upstream stage in `ResolvedPipeline::stages`.
        stage: usize,
        /// Path inside its output, `/`-separated.
        subpath: Option<String>,
    },
}

/// The checked graph of a pipeline.
#[derive(Debug)]
pub struct Dag {
    /// One node per stage (weight: index into `ResolvedPipeline::stages`); edges go
    /// from upstream to downstream.
    pub graph: DiGraph<usize, ()>,
    /// Stage indices in a topological order that keeps file order where it can.
    pub order: Vec<usize>,
    /// Per stage, its inputs by name.
    pub bindings: Vec<BTreeMap<String, Binding>>,
}

/// How a cycle reads: a stage that reads itself, or the circle of stages.
fn cycle_message(stages: &[String]) -> String {
    match stages {
        [only, _] => format!("stage `{only}` reads its own output (a dependency cycle)"),
        _ => format!(
            "dependency cycle: {} (each stage reads the output of the one before it)",
            stages.join(" → ")
        ),
    }
}

/// A pipeline whose graph is invalid.
#[derive(Debug, thiserror::Error)]
pub enum DagError {
    /// Stages depend on each other in a circle.
    #[error("{}: {}", .file.display(), cycle_message(.stages))]
    Cycle {
        /// The pipeline file.
        file: std::path::PathBuf,
        /// The stages on the cycle, first one repeated at the end.
        stages: Vec<String>,
    },
    /// An input is neither a stage nor an existing path.
    #[error("stage `{stage}`, input `{input}` ({at}): `{declared}` is not a stage, and {path} does not exist{}", help_suffix(.help))]
    MissingInput {
        /// Stage that needs it.
        stage: String,
        /// Input name.
        input: String,
        /// As written.
        declared: String,
        /// Where it was looked for.
        path: String,
        /// Where the input is declared.
        at: Origin,
        /// A suggestion.
        help: Option<String>,
    },
    /// A reference reaches outside the upstream output (`stage/../x`).
    #[error(
        "stage `{stage}`, input `{input}` ({at}): `{declared}` must stay inside the output of stage `{upstream}`"
    )]
    EscapingReference {
        /// Stage that needs it.
        stage: String,
        /// Input name.
        input: String,
        /// As written.
        declared: String,
        /// Upstream stage.
        upstream: String,
        /// Where the input is declared.
        at: Origin,
    },
    /// An `hf:` id that does not resolve in the local Hugging Face cache.
    #[error("stage `{stage}`, input `{input}` ({at}): {cause}")]
    HubModel {
        /// Stage that needs it.
        stage: String,
        /// Input name.
        input: String,
        /// Where the input is declared.
        at: Origin,
        /// Why it does not resolve (names the missing path and the download command).
        cause: HfError,
    },
    /// An `hf:` id given to an input that does not read a model or tokenizer directory.
    #[error(
        "stage `{stage}`, input `{input}` ({at}): `{declared}` is a Hugging Face model, but `{input}` expects {expected}"
    )]
    NotAModelInput {
        /// Stage.
        stage: String,
        /// Input name.
        input: String,
        /// As written.
        declared: String,
        /// What the input accepts.
        expected: String,
        /// Where the input is declared.
        at: Origin,
    },
    /// The kind has no input of that name.
    #[error("stage `{stage}` ({kind}) has no input `{input}` ({at}); its inputs are: {expected}{}", help_suffix(.help))]
    UnknownInput {
        /// Stage.
        stage: String,
        /// Its kind.
        kind: String,
        /// The unknown input name.
        input: String,
        /// The kind's input names.
        expected: String,
        /// Where the input is declared.
        at: Origin,
        /// A suggestion.
        help: Option<String>,
    },
    /// A required input is not given.
    #[error("stage `{stage}` ({kind}) needs input `{input}`")]
    MissingRequiredInput {
        /// Stage.
        stage: String,
        /// Its kind.
        kind: String,
        /// The missing input.
        input: String,
    },
    /// A model directory given as a model input is one trainyard cannot load (another
    /// architecture, a shard missing), found before anything runs.
    #[error("stage `{stage}`, input `{input}` ({at}): {message}")]
    UnusableModel {
        /// Stage.
        stage: String,
        /// Input name.
        input: String,
        /// What is wrong, naming the file.
        message: String,
        /// Where the input is declared.
        at: Origin,
    },
    /// An upstream stage produces the wrong kind of artifact for this input.
    #[error(
        "stage `{stage}`, input `{input}` ({at}): stage `{upstream}` ({upstream_kind}) produces {found:?}, but `{input}` expects {expected}"
    )]
    TypeMismatch {
        /// Stage.
        stage: String,
        /// Input name.
        input: String,
        /// Upstream stage.
        upstream: String,
        /// Upstream kind.
        upstream_kind: String,
        /// What it produces.
        found: Artifact,
        /// What the input accepts.
        expected: String,
        /// Where the input is declared.
        at: Origin,
    },
}

/// Refuses a model directory bound to a model input (`model`, `base`) that trainyard
/// cannot load — another architecture, a missing shard — from its config.json and index
/// alone, so that nothing runs first. Other faults (a config.json that does not parse, no
/// weights at all) are left to the stage, which names them the same way when it loads
/// the model. `site` names the stage, the input and where it is declared.
fn check_model_input(
    slot: Option<&InputSlot>,
    path: &Path,
    site: impl FnOnce() -> (String, String, Origin),
) -> Result<(), Box<DagError>> {
    use crate::model::ModelError;
    if slot.is_some_and(|slot| slot.accepts == crate::stages::MODEL_SOURCES)
        && path.join("config.json").is_file()
        && let Err(error @ (ModelError::Unsupported { .. } | ModelError::MissingShard { .. })) =
            crate::model::check_model_dir(path)
    {
        let (stage, input, at) = site();
        return Err(Box::new(DagError::UnusableModel {
            stage,
            input,
            message: error.to_string(),
            at,
        }));
    }
    Ok(())
}

fn help_suffix(help: &Option<String>) -> String {
    help.as_ref()
        .map(|help| format!("; {help}"))
        .unwrap_or_default()
}

/// Fails with `mismatch()` when `slot` exists and does not accept `produced`.
fn check_accepts(
    slot: Option<&InputSlot>,
    produced: Artifact,
    mismatch: impl FnOnce() -> DagError,
) -> Result<(), Box<DagError>> {
    match slot {
        Some(slot) if !slot.accepts.contains(&produced) => Err(Box::new(mismatch())),
        _ => Ok(()),
    }
}

/// What a slot accepts, for messages: `Files or Corpus`.
fn accepted(slot: Option<&InputSlot>) -> String {
    let names: Vec<String> = slot
        .map(|slot| {
            slot.accepts
                .iter()
                .map(|artifact| format!("{artifact:?}"))
                .collect()
        })
        .unwrap_or_default();
    names.join(" or ")
}

/// Splits a reference `stage/sub/path` into the stage name and the subpath, if the
/// first component names a stage (see the module doc for the rule).
pub fn as_reference<'a>(
    declared: &'a str,
    stage_names: &BTreeSet<&str>,
) -> Option<(&'a str, Option<&'a str>)> {
    if declared.starts_with("./") || declared.starts_with("../") || declared.starts_with('/') {
        return None;
    }
    let (first, rest) = match declared.split_once('/') {
        Some((first, rest)) => (
            first,
            Some(rest.trim_end_matches('/')).filter(|rest| !rest.is_empty()),
        ),
        None => (declared, None),
    };
    stage_names.contains(first).then_some((first, rest))
}

/// Builds and checks the graph of `pipeline`.
pub fn build(pipeline: &ResolvedPipeline) -> Result<Dag, Box<DagError>> {
    let names: BTreeSet<&str> = pipeline
        .stages
        .iter()
        .map(|stage| stage.name.as_str())
        .collect();
    let index_of: BTreeMap<&str, usize> = pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(index, stage)| (stage.name.as_str(), index))
        .collect();
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
        .map(|index| graph.add_node(index))
        .collect();
    let mut bindings = Vec::with_capacity(pipeline.stages.len());

    for (index, stage) in pipeline.stages.iter().enumerate() {
        let mut stage_bindings = BTreeMap::new();
        if let InputRules::Slots(slots) = stage.kind.inputs {
            for slot in slots.iter().filter(|slot| slot.required) {
                if !stage.inputs.contains_key(slot.name) {
                    return Err(Box::new(DagError::MissingRequiredInput {
                        stage: stage.name.clone(),
                        kind: stage.kind.name.to_string(),
                        input: slot.name.to_string(),
                    }));
                }
            }
        }
        for (input, declared) in &stage.inputs {
            let at = pipeline
                .origins
                .get(&format!("stages.{}.inputs.{input}", stage.name))
                .cloned()
                .unwrap_or(Origin::Default);
            let slot = stage.kind.slot(input);
            if let InputRules::Slots(slots) = stage.kind.inputs
                && slot.is_none()
            {
                let expected: Vec<&str> = slots.iter().map(|slot| slot.name).collect();
                let listed: Vec<String> = slots
                    .iter()
                    .map(|slot| match slot.many {
                        true => format!("{0}, {0}_*", slot.name),
                        false => slot.name.to_string(),
                    })
                    .collect();
                return Err(Box::new(DagError::UnknownInput {
                    stage: stage.name.clone(),
                    kind: stage.kind.name.to_string(),
                    input: input.clone(),
                    expected: listed.join(", "),
                    help: did_you_mean(input, expected.iter().copied()),
                    at,
                }));
            }
            let binding = match as_reference(declared, &names) {
                // Stage names cannot hold `:`, so an `hf:` id is never a reference.
                None if hf_cache::is_model_id(declared) => {
                    // Any input that takes a model takes its tokenizer directory too.
                    if slot.is_some_and(|slot| !slot.accepts.contains(&Artifact::Model)) {
                        return Err(Box::new(DagError::NotAModelInput {
                            stage: stage.name.clone(),
                            input: input.clone(),
                            declared: declared.clone(),
                            expected: accepted(slot),
                            at,
                        }));
                    }
                    let snapshot = hf_cache::resolve(declared).map_err(|cause| {
                        Box::new(DagError::HubModel {
                            stage: stage.name.clone(),
                            input: input.clone(),
                            at: at.clone(),
                            cause,
                        })
                    })?;
                    check_model_input(slot, &snapshot.path, || {
                        (stage.name.clone(), input.clone(), at)
                    })?;
                    Binding::External {
                        declared: declared.clone(),
                        path: snapshot.path.clone(),
                        hub: Some(Box::new(snapshot)),
                    }
                }
                Some((upstream, subpath)) => {
                    let upstream_index = index_of[upstream];
                    if let Some(subpath) = subpath
                        && Path::new(subpath)
                            .components()
                            .any(|component| !matches!(component, Component::Normal(_)))
                    {
                        return Err(Box::new(DagError::EscapingReference {
                            stage: stage.name.clone(),
                            input: input.clone(),
                            declared: declared.clone(),
                            upstream: upstream.to_string(),
                            at,
                        }));
                    }
                    let upstream_kind = pipeline.stages[upstream_index].kind;
                    let produced = if subpath.is_some() {
                        Artifact::Files
                    } else {
                        upstream_kind.output
                    };
                    check_accepts(slot, produced, || DagError::TypeMismatch {
                        stage: stage.name.clone(),
                        input: input.clone(),
                        upstream: upstream.to_string(),
                        upstream_kind: upstream_kind.name.to_string(),
                        found: produced,
                        expected: accepted(slot),
                        at: at.clone(),
                    })?;
                    graph.add_edge(nodes[upstream_index], nodes[index], ());
                    Binding::Stage {
                        stage: upstream_index,
                        subpath: subpath.map(str::to_string),
                    }
                }
                None => {
                    let path = std::path::absolute(pipeline.base_dir.join(declared))
                        .unwrap_or_else(|_| pipeline.base_dir.join(declared));
                    if !path.exists() {
                        let first = declared.split('/').next().unwrap_or(declared);
                        return Err(Box::new(DagError::MissingInput {
                            stage: stage.name.clone(),
                            input: input.clone(),
                            declared: declared.clone(),
                            path: path.display().to_string(),
                            help: did_you_mean(first, names.iter().copied())
                                .map(|help| format!("{help} (a stage)")),
                            at,
                        }));
                    }
                    check_accepts(slot, Artifact::Files, || DagError::TypeMismatch {
                        stage: stage.name.clone(),
                        input: input.clone(),
                        upstream: declared.clone(),
                        upstream_kind: "file".to_string(),
                        found: Artifact::Files,
                        expected: accepted(slot),
                        at: at.clone(),
                    })?;
                    check_model_input(slot, &path, || (stage.name.clone(), input.clone(), at))?;
                    Binding::External {
                        declared: declared.clone(),
                        path,
                        hub: None,
                    }
                }
            };
            stage_bindings.insert(input.clone(), binding);
        }
        bindings.push(stage_bindings);
    }

    if let Some(cycle) = find_cycle(&graph) {
        let mut stages: Vec<String> = cycle
            .iter()
            .map(|&index| pipeline.stages[index].name.clone())
            .collect();
        stages.push(stages[0].clone());
        return Err(Box::new(DagError::Cycle {
            file: pipeline.file.path.clone(),
            stages,
        }));
    }
    let order = stable_topological_order(&graph);
    Ok(Dag {
        graph,
        order,
        bindings,
    })
}

/// Kahn's algorithm, always taking the ready stage that comes first in the file.
fn stable_topological_order(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    let mut in_degree: Vec<usize> = graph
        .node_indices()
        .map(|node| {
            graph
                .neighbors_directed(node, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = graph
        .node_indices()
        .filter(|node| in_degree[node.index()] == 0)
        .map(|node| Reverse(node.index()))
        .collect();
    let mut order = Vec::with_capacity(in_degree.len());
    while let Some(Reverse(index)) = ready.pop() {
        order.push(graph[NodeIndex::new(index)]);
        for next in graph.neighbors_directed(NodeIndex::new(index), petgraph::Direction::Outgoing) {
            in_degree[next.index()] -= 1;
            if in_degree[next.index()] == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    order
}

/// A cycle as a list of stage indices in edge order, if the graph has one.
fn find_cycle(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    let component = petgraph::algo::tarjan_scc(graph)
        .into_iter()
        .find(|component| component.len() > 1 || graph.contains_edge(component[0], component[0]))?;
    let members: BTreeSet<NodeIndex> = component.iter().copied().collect();
    let start = *members.iter().next()?;
    // Depth-first walk inside the strongly connected component back to `start`.
    let mut path = vec![start];
    let mut visited = BTreeSet::from([start]);
    fn walk(
        graph: &DiGraph<usize, ()>,
        members: &BTreeSet<NodeIndex>,
        start: NodeIndex,
        path: &mut Vec<NodeIndex>,
        visited: &mut BTreeSet<NodeIndex>,
    ) -> bool {
        let Some(&current) = path.last() else {
            return false;
        };
        let mut next: Vec<NodeIndex> = graph
            .neighbors(current)
            .filter(|node| members.contains(node))
            .collect();
        next.sort();
        for node in next {
            if node == start {
                return true;
            }
            if visited.insert(node) {
                path.push(node);
                if walk(graph, members, start, path, visited) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(graph, &members, start, &mut path, &mut visited)
        .then(|| path.iter().map(|&node| graph[node]).collect())
}

impl Dag {
    /// Indices of the stages `index` reads from directly.
    pub fn upstream(&self, index: usize) -> Vec<usize> {
        let mut upstream: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(index), petgraph::Direction::Incoming)
            .map(|node| self.graph[node])
            .collect();
        upstream.sort();
        upstream.dedup();
        upstream
    }

    /// `index` and every stage it depends on, transitively.
    pub fn ancestors_and_self(&self, index: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([index]);
        let mut stack = vec![index];
        while let Some(current) = stack.pop() {
            for upstream in self.upstream(current) {
                if seen.insert(upstream) {
                    stack.push(upstream);
                }
            }
        }
        seen
    }

    /// The graph as text, Mermaid or Graphviz dot.
    pub fn render(&self, pipeline: &ResolvedPipeline, format: DagFormat) -> String {
        let name = |index: usize| pipeline.stages[index].name.as_str();
        let mut out = String::new();
        match format {
            DagFormat::Text => {
                for &index in &self.order {
                    let stage = &pipeline.stages[index];
                    let upstream: Vec<&str> = self.upstream(index).into_iter().map(name).collect();
                    if upstream.is_empty() {
                        out.push_str(&format!("{} ({})\n", stage.name, stage.kind.name));
                    } else {
                        out.push_str(&format!(
                            "{} ({}) ← {}\n",
                            stage.name,
                            stage.kind.name,
                            upstream.join(", ")
                        ));
                    }
                }
            }
            DagFormat::Mermaid => {
                out.push_str("graph TD\n");
                for &index in &self.order {
                    out.push_str(&format!(
                        "    {}[\"{} ({})\"]\n",
                        mermaid_id(name(index)),
                        name(index),
                        pipeline.stages[index].kind.name
                    ));
                }
                for &index in &self.order {
                    for upstream in self.upstream(index) {
                        out.push_str(&format!(
                            "    {} --> {}\n",
                            mermaid_id(name(upstream)),
                            mermaid_id(name(index))
                        ));
                    }
                }
            }
            DagFormat::Dot => {
                out.push_str(&format!(
                    "digraph \"{}\" {{\n    rankdir=LR;\n",
                    pipeline.name.replace('"', "\\\"")
                ));
                for &index in &self.order {
                    out.push_str(&format!(
                        "    \"{}\" [label=\"{}\\n({})\"];\n",
                        name(index),
                        name(index),
                        pipeline.stages[index].kind.name
                    ));
                }
                for &index in &self.order {
                    for upstream in self.upstream(index) {
                        out.push_str(&format!(
                            "    \"{}\" -> \"{}\";\n",
                            name(upstream),
                            name(index)
                        ));
                    }
                }
                out.push_str("}\n");
            }
        }
        out
    }
}

fn mermaid_id(name: &str) -> String {
    name.replace('-', "_")
}

/// Output formats of `trainyard dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    /// One line per stage with its upstream stages.
    Text,
    /// A Mermaid flowchart.
    Mermaid,
    /// Graphviz dot.
    Dot,
}
