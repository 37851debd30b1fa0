//! The SciTags registry: experiment and activity names <-> numeric ids.
//!
//! Policies name tags by name, id or "scitag" integer (spec: registry.md); the registry
//! turns names into the ids that travel in flow labels and fireflies, and ids back into
//! names for `inspect`, metrics and logs. The snapshot published by scitags.org ships
//! inside the binary so that the daemon never needs the network to start.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The snapshot of scitags.org's `api.json` shipped with flowd-rs.
const BUNDLED_JSON: &str = include_str!("scitags-registry.json");

/// Experiment ids fit 9 bits in the flow label; 0 means "untagged" and is never valid.
pub const EXPERIMENT_ID_MAX: u16 = 511;
/// Activity ids fit 6 bits in the flow label.
pub const ACTIVITY_ID_MAX: u8 = 63;

/// The collaboration's single-integer form of a tag: `expId << 6 | activityId`.
pub fn scitag(experiment: u16, activity: u8) -> u32 {
    (u32::from(experiment) << 6) | u32::from(activity)
}

/// Splits a scitag integer; `None` if the experiment part is 0 or does not fit 9 bits.
pub fn split_scitag(scitag: u32) -> Option<(u16, u8)> {
    let exp = scitag >> 6;
    if exp == 0 || exp > u32::from(EXPERIMENT_ID_MAX) {
        return None;
    }
    Some((exp as u16, (scitag & 0x3f) as u8))
}

/// One activity, scoped to its experiment ("Production Input" is 15 for atlas, 12 for cms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub name: String,
    pub id: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    pub name: String,
    pub id: u16,
    pub activities: Vec<Activity>,
}

impl Experiment {
    pub fn activity_by_id(&self, id: u8) -> Option<&Activity> {
        self.activities.iter().find(|a| a.id == id)
    }

    /// Looks an activity up by name (normalised, see [`normalize`]).
    pub fn activity(&self, name: &str) -> Result<&Activity, LookupError> {
        lookup(
            "activity",
            Some(&self.name),
            name,
            self.activities.iter().map(|a| (a.name.as_str(), a)),
        )
    }
}

/// Why a registry document was refused.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{path}: cannot read registry: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry is not valid JSON of the expected shape: {0}")]
    Shape(#[from] serde_json::Error),
    #[error("registry version {0} is not supported (expected 1)")]
    Version(i64),
    #[error("registry has no experiments")]
    Empty,
    #[error("experiment {name:?} has id {id}, outside 1..=511")]
    ExperimentId { name: String, id: i64 },
    #[error("experiment id {id} is used by both {first:?} and {second:?}")]
    DuplicateExperiment {
        id: u16,
        first: String,
        second: String,
    },
    #[error("experiment {exp:?}: activity {name:?} has id {id}, outside 0..=63")]
    ActivityId { exp: String, name: String, id: i64 },
    #[error("experiment {exp:?}: activity id {id} is used by both {first:?} and {second:?}")]
    DuplicateActivity {
        exp: String,
        id: u8,
        first: String,
        second: String,
    },
    #[error("registry file {path}: {inner}")]
    InFile {
        path: PathBuf,
        inner: Box<RegistryError>,
    },
}

/// Why a name lookup failed. Display is a complete sentence fragment usable after
/// `file:line:col: `.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LookupError {
    #[error(
        "unknown {kind} {name:?}{}; {}",
        scope_suffix(scope),
        suggest(suggestions, known)
    )]
    Unknown {
        kind: &'static str,
        scope: Option<String>,
        name: String,
        /// Close matches, best first.
        suggestions: Vec<String>,
        /// Every name in scope (shown only when nothing is close).
        known: Vec<String>,
    },
    #[error("{kind} {name:?} is ambiguous{}: it matches {}; write the name exactly or use the numeric id", scope_suffix(scope), quote_list(candidates))]
    Ambiguous {
        kind: &'static str,
        scope: Option<String>,
        name: String,
        candidates: Vec<String>,
    },
}

fn scope_suffix(scope: &Option<String>) -> String {
    match scope {
        Some(s) => format!(" in experiment {s:?}"),
        None => String::new(),
    }
}

fn quote_list(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn suggest(suggestions: &[String], known: &[String]) -> String {
    if suggestions.is_empty() {
        format!("known names: {}", quote_list(known))
    } else {
        format!(
            "did you mean {}?",
            quote_list(suggestions).replace(", ", " or ")
        )
    }
}

/// Normalised form used for name matching: lower case, without spaces, `_` and `-`
/// (registry.md: names in the registry are not normalised, operators should not have to
/// reproduce `Upload/Download (Job)` byte for byte).
pub fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn lookup<'a, T>(
    kind: &'static str,
    scope: Option<&str>,
    name: &str,
    items: impl Iterator<Item = (&'a str, &'a T)> + Clone,
) -> Result<&'a T, LookupError> {
    // An exact spelling always wins, so that a colliding pair stays reachable.
    if let Some((_, t)) = items.clone().find(|(n, _)| *n == name) {
        return Ok(t);
    }
    let want = normalize(name);
    let hits: Vec<(&str, &T)> = items
        .clone()
        .filter(|(n, _)| normalize(n) == want)
        .collect();
    match hits.len() {
        1 => Ok(hits[0].1),
        0 => {
            let mut scored: Vec<(f64, &str)> = items
                .clone()
                .map(|(n, _)| (strsim::jaro_winkler(&want, &normalize(n)), n))
                .filter(|(s, _)| *s >= 0.8)
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            Err(LookupError::Unknown {
                kind,
                scope: scope.map(str::to_owned),
                name: name.to_owned(),
                suggestions: scored.iter().take(3).map(|(_, n)| n.to_string()).collect(),
                known: items.map(|(n, _)| n.to_string()).collect(),
            })
        }
        _ => Err(LookupError::Ambiguous {
            kind,
            scope: scope.map(str::to_owned),
            name: name.to_owned(),
            candidates: hits.iter().map(|(n, _)| n.to_string()).collect(),
        }),
    }
}

/// A validated registry document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub modified: Option<String>,
    pub experiments: Vec<Experiment>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::bundled()
    }
}

#[derive(Deserialize)]
struct RawRegistry {
    version: i64,
    modified: Option<String>,
    experiments: Vec<RawExperiment>,
}

#[derive(Deserialize)]
struct RawExperiment {
    #[serde(rename = "expName")]
    name: String,
    #[serde(rename = "expId")]
    id: i64,
    activities: Vec<RawActivity>,
}

#[derive(Deserialize)]
struct RawActivity {
    #[serde(rename = "activityName")]
    name: String,
    #[serde(rename = "activityId")]
    id: i64,
}

impl Registry {
    /// The snapshot shipped in the binary.
    pub fn bundled() -> Registry {
        // The snapshot is a build input checked by `bundled_registry_is_valid`; failing
        // here would be a packaging bug, not something the world controls.
        Registry::from_json_bytes(BUNDLED_JSON.as_bytes()).expect("bundled registry is valid")
    }

    /// A local replacement for the snapshot (the configuration's `registry` file).
    pub fn from_file(path: &Path) -> Result<Registry, RegistryError> {
        let bytes = std::fs::read(path).map_err(|source| RegistryError::Io {
            path: path.to_owned(),
            source,
        })?;
        Registry::from_json_bytes(&bytes).map_err(|e| RegistryError::InFile {
            path: path.to_owned(),
            inner: Box::new(e),
        })
    }

    /// Parses and validates a registry document (e.g. a fresh download) before use.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Registry, RegistryError> {
        let raw: RawRegistry = serde_json::from_slice(bytes)?;
        if raw.version != 1 {
            return Err(RegistryError::Version(raw.version));
        }
        if raw.experiments.is_empty() {
            return Err(RegistryError::Empty);
        }
        let mut experiments: Vec<Experiment> = Vec::with_capacity(raw.experiments.len());
        for e in raw.experiments {
            if !(1..=i64::from(EXPERIMENT_ID_MAX)).contains(&e.id) {
                return Err(RegistryError::ExperimentId {
                    name: e.name,
                    id: e.id,
                });
            }
            let id = e.id as u16;
            if let Some(prev) = experiments.iter().find(|x| x.id == id) {
                return Err(RegistryError::DuplicateExperiment {
                    id,
                    first: prev.name.clone(),
                    second: e.name,
                });
            }
            let mut activities: Vec<Activity> = Vec::with_capacity(e.activities.len());
            let mut seen = HashSet::new();
            for a in e.activities {
                if !(0..=i64::from(ACTIVITY_ID_MAX)).contains(&a.id) {
                    return Err(RegistryError::ActivityId {
                        exp: e.name,
                        name: a.name,
                        id: a.id,
                    });
                }
                let aid = a.id as u8;
                if !seen.insert(aid) {
                    let first = activities
                        .iter()
                        .find(|x| x.id == aid)
                        .map(|x| x.name.clone());
                    return Err(RegistryError::DuplicateActivity {
                        exp: e.name,
                        id: aid,
                        first: first.unwrap_or_default(),
                        second: a.name,
                    });
                }
                activities.push(Activity {
                    name: a.name,
                    id: aid,
                });
            }
            experiments.push(Experiment {
                name: e.name,
                id,
                activities,
            });
        }
        Ok(Registry {
            modified: raw.modified,
            experiments,
        })
    }

    pub fn experiment_by_id(&self, id: u16) -> Option<&Experiment> {
        self.experiments.iter().find(|e| e.id == id)
    }

    /// Looks an experiment up by name (normalised, see [`normalize`]).
    pub fn experiment(&self, name: &str) -> Result<&Experiment, LookupError> {
        lookup(
            "experiment",
            None,
            name,
            self.experiments.iter().map(|e| (e.name.as_str(), e)),
        )
    }

    /// Looks an activity up by name within the experiment with id `exp`.
    pub fn activity(&self, exp: u16, name: &str) -> Result<&Activity, LookupError> {
        match self.experiment_by_id(exp) {
            Some(e) => e.activity(name),
            None => Err(LookupError::Unknown {
                kind: "experiment",
                scope: None,
                name: exp.to_string(),
                suggestions: Vec::new(),
                known: self.experiments.iter().map(|e| e.name.clone()).collect(),
            }),
        }
    }

    pub fn activity_by_id(&self, exp: u16, act: u8) -> Option<&Activity> {
        self.experiment_by_id(exp)?.activity_by_id(act)
    }

    /// Human form of a tag for displays: names where the registry has them, ids otherwise.
    pub fn name_of(&self, exp: u16, act: u8) -> TagName {
        let e = self.experiment_by_id(exp);
        TagName {
            experiment: e.map_or_else(|| exp.to_string(), |e| e.name.clone()),
            activity: e
                .and_then(|e| e.activity_by_id(act))
                .map_or_else(|| act.to_string(), |a| a.name.clone()),
        }
    }
}

/// Display form of a tag, e.g. `atlas/Production Input` or `300/7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagName {
    pub experiment: String,
    pub activity: String,
}

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.experiment, self.activity)
    }
}
