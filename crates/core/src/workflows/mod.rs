//! The catalogue of workflows a deployment knows: their stages, their inputs and their queue.
//!
//! Invariant: workflow, stage and queue names are stored with runs and frozen once shipped;
//! renaming a Rust type never changes them.

pub mod demo;
pub mod noop;

use std::{collections::BTreeMap, sync::Arc};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{schema::InputSchema, stage::Stage, store::RunKind};

/// The core's queue name. Every workflow names its queue (tenants name their own); a process's
/// queues are those of its catalogue ([`Catalog::queues`]), and workers subscribe to some of them
/// with `--queues`.
pub mod queues {
    pub const WORKFLOWS: &str = "workflows";
}

pub use crate::schema::InputError;

/// Parses inputs into a typed struct, naming the field that does not fit.
pub fn parse_inputs<T: DeserializeOwned>(inputs: &Value) -> Result<T, InputError> {
    serde_path_to_error::deserialize(inputs).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        // A missing or unknown field is reported one level up by serde: name the field itself.
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), named) {
            (".", Some(name)) => format!("inputs.{name}"),
            (".", None) => "inputs".to_owned(),
            (path, Some(name)) if path.rsplit('.').next() == Some(name) => format!("inputs.{path}"),
            (path, Some(name)) => format!("inputs.{path}.{name}"),
            (path, None) => format!("inputs.{path}"),
        };
        InputError { field, message }
    })
}

/// A named, ordered list of stages.
pub trait Workflow: Send + Sync {
    fn kind(&self) -> RunKind;
    /// The stored name. Frozen once shipped.
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// The queue its runs are delivered on.
    fn queue(&self) -> &'static str;
    fn stages(&self) -> &[Box<dyn Stage>];
    /// The JSON Schema of the inputs: published (`/openapi.json`, `/workflows`) and enforced
    /// as published, limits included.
    fn input_schema(&self) -> InputSchema;
    /// Checks the inputs at submission against [`Workflow::input_schema`], so bad input is
    /// refused before anything is stored (integers written as `2.0` become `2`).
    fn validate(&self, inputs: &mut Value) -> Result<(), InputError> {
        self.input_schema().check(inputs)
    }
    /// The run's result, from every stage's output; by default the last stage's output.
    fn result(&self, outputs: &BTreeMap<String, Value>) -> Value {
        self.stages()
            .last()
            .and_then(|stage| outputs.get(stage.name()).cloned())
            .unwrap_or(Value::Null)
    }

    /// Whether runs may use live providers (`provider_mode: live`) in this deployment: a
    /// missing key or provider is refused at submission, with an error code and a message
    /// naming what to set.
    fn check_live(&self) -> Result<(), (&'static str, String)> {
        Ok(())
    }

    /// The budget a run gets when its submission names none.
    fn default_budget(&self, _inputs: &Value) -> Option<crate::money::Usd> {
        None
    }

    fn stage_names(&self) -> Vec<String> {
        self.stages().iter().map(|s| s.name().to_owned()).collect()
    }
}

/// Every workflow this build knows, by kind and name.
#[derive(Default)]
pub struct Catalog {
    workflows: BTreeMap<(&'static str, &'static str), Arc<dyn Workflow>>,
}

impl Catalog {
    /// The core's own workflows: `demo` and `noop`.
    pub fn with_builtins() -> Self {
        let mut catalog = Self::default();
        catalog.add(Arc::new(demo::Demo::new()));
        catalog.add(Arc::new(noop::Noop::new()));
        catalog
    }

    pub fn add(&mut self, workflow: Arc<dyn Workflow>) {
        self.workflows
            .insert((workflow.kind().as_str(), workflow.name()), workflow);
    }

    pub fn get(&self, kind: RunKind, name: &str) -> Option<Arc<dyn Workflow>> {
        self.workflows
            .iter()
            .find(|((k, n), _)| *k == kind.as_str() && *n == name)
            .map(|(_, w)| w.clone())
    }

    /// Every workflow, by kind and name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Workflow>> {
        self.workflows.values()
    }

    /// The queues of the catalogue's workflows, sorted, each once.
    pub fn queues(&self) -> Vec<&'static str> {
        let mut queues: Vec<&'static str> = self.workflows.values().map(|w| w.queue()).collect();
        queues.sort_unstable();
        queues.dedup();
        queues
    }

    pub fn of_kind(&self, kind: RunKind) -> impl Iterator<Item = &Arc<dyn Workflow>> {
        self.workflows
            .iter()
            .filter(move |((k, _), _)| *k == kind.as_str())
            .map(|(_, w)| w)
    }
}
