//! The definitions file (SPEC §1): sources and feature sets, parsed into typed structs.
//!
//! Parsing keeps the position of every value so that each error names the file, line and column,
//! says what is wrong and how to mend it. All errors of a file are collected and reported
//! together; a file with any error never yields [`Definitions`], so a bad file never starts a job.
//! Expressions (filters and aggregations) are checked against the source schema by
//! [`crate::compile`].

use std::fmt;
use std::path::{Path, PathBuf};

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoaderOptions, Node, Span};

use crate::duration::Duration;
use crate::value::ValueType;
use crate::window::Window;

/// A position in a definitions file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn of(span: &Span) -> Self {
        span.start().map_or(Position::default(), |m| Position { line: m.line(), column: m.column() })
    }
}

/// One problem in a definitions file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    pub file: String,
    pub position: Position,
    /// What is wrong.
    pub message: String,
    /// How to mend it.
    pub help: Option<String>,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.position.line, self.position.column, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every problem found in a definitions file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionErrors(pub Vec<DefinitionError>);

impl fmt::Display for DefinitionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DefinitionErrors {}

/// Where a table lives: a Delta table or Parquet (a file, folder or glob), as a URL or local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Delta(String),
    Parquet(String),
}

impl Location {
    /// The URL or path as written (after resolving relative paths).
    pub fn url(&self) -> &str {
        match self {
            Location::Delta(url) | Location::Parquet(url) => url,
        }
    }
}

/// A source's Kafka topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSource {
    pub topic: String,
    /// Message format; only `json` is supported.
    pub format: String,
}

/// A stream of events with a schema, an offline copy (history) and an online copy (Kafka).
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    /// Columns in declared order.
    pub schema: Vec<(String, ValueType)>,
    pub event_time: String,
    pub arrival_time: Option<String>,
    pub history: Option<Location>,
    pub kafka: Option<KafkaSource>,
    pub watermark: Duration,
    pub allowed_lateness: Duration,
    pub idle_timeout: Option<Duration>,
}

impl Source {
    /// The declared type of a column.
    pub fn column_type(&self, column: &str) -> Option<ValueType> {
        self.schema.iter().find(|(name, _)| name == column).map(|(_, t)| *t)
    }
}

/// One aggregation as written: `name: sql`, with the position of the SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregationDef {
    pub name: String,
    pub sql: String,
    pub position: Position,
}

/// Where a feature set's rows go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputDef {
    pub table: Option<Location>,
    pub topic: Option<String>,
    pub online: Option<String>,
}

/// A feature set: aggregations of one source per key and window.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSet {
    pub name: String,
    pub source: String,
    pub key: Vec<String>,
    pub filter: Option<String>,
    pub filter_position: Position,
    pub window: Window,
    pub aggregations: Vec<AggregationDef>,
    pub serving_delay: Duration,
    pub output: OutputDef,
    pub position: Position,
}

/// A parsed, structurally valid definitions file.
#[derive(Debug, Clone, PartialEq)]
pub struct Definitions {
    /// The file as named by the user, for messages.
    pub file: String,
    pub sources: Vec<Source>,
    pub features: Vec<FeatureSet>,
}

impl Definitions {
    /// Reads and parses a definitions file; relative table paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Self, DefinitionErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            DefinitionErrors(vec![DefinitionError {
                file: file.clone(),
                position: Position { line: 0, column: 0 },
                message: format!("cannot read the definitions file: {e}"),
                help: Some("check the path; `lockstep validate FILE` takes a YAML file".into()),
            }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&file, &text, &base)
    }

    /// Parses definitions from text; `file` names it in messages, `base` resolves relative paths.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Self, DefinitionErrors> {
        let mut parser =
            Parser { file: file.to_string(), base: base.to_path_buf(), errors: Vec::new(), broken_sources: Vec::new() };
        let root =
            marked_yaml::parse_yaml_with_options(0, text, LoaderOptions::default().error_on_duplicate_keys(true))
                .map_err(|e| DefinitionErrors(vec![parser.load_error(e)]))?;
        let definitions = parser.definitions(&root);
        if parser.errors.is_empty() {
            return Ok(definitions);
        }
        // Also check the expressions of the feature sets that did parse, so that one run of
        // `validate` reports every problem in the file.
        for feature in definitions.features.iter().filter(|f| !parser.broken_sources.contains(&f.source)) {
            if let Err(DefinitionErrors(mut errors)) = crate::compile::compile_feature(&definitions, feature) {
                parser.errors.append(&mut errors);
            }
        }
        parser.errors.sort_by_key(|e| (e.position.line, e.position.column));
        Err(DefinitionErrors(parser.errors))
    }

    /// The source a feature set reads.
    pub fn source_of(&self, feature: &FeatureSet) -> &Source {
        // Parsing refuses feature sets whose source is unknown, so the lookup cannot fail.
        self.sources.iter().find(|s| s.name == feature.source).expect("source checked at parse time")
    }

    /// A feature set by name, or an error listing the names there are.
    pub fn feature(&self, name: &str) -> Result<&FeatureSet, String> {
        self.features.iter().find(|f| f.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
            format!("{}: no feature set `{name}`; the file defines: {}", self.file, names.join(", "))
        })
    }
}

struct Parser {
    file: String,
    base: PathBuf,
    errors: Vec<DefinitionError>,
    /// Sources with errors of their own: their feature sets' expressions are not checked, since
    /// every reference to a broken column would only repeat the source's error.
    broken_sources: Vec<String>,
}

impl Parser {
    fn error(&mut self, span: &Span, message: impl Into<String>, help: impl Into<Option<String>>) {
        self.errors.push(DefinitionError {
            file: self.file.clone(),
            position: Position::of(span),
            message: message.into(),
            help: help.into(),
        });
    }

    fn load_error(&self, error: marked_yaml::LoadError) -> DefinitionError {
        use marked_yaml::LoadError::*;
        let (marker, message, help) = match &error {
            DuplicateKey(inner) => (
                inner.key.span().start().copied(),
                format!(
                    "duplicate name `{}` (first defined at line {})",
                    inner.key.as_str(),
                    inner.prev_key.span().start().map_or(0, |m| m.line())
                ),
                Some(
                    "every source, feature set, column and aggregation needs a unique name in its mapping".to_string(),
                ),
            ),
            TopLevelMustBeMapping(m) => {
                (Some(*m), "the file must be a mapping with `sources:` and `features:`".into(), None)
            }
            ScanError(m, _) => (
                Some(*m),
                format!("not valid YAML: {error}"),
                Some("check indentation and quoting around this point".into()),
            ),
            other => (None, format!("not valid YAML: {other}"), None),
        };
        DefinitionError {
            file: self.file.clone(),
            position: marker.map_or(Position::default(), |m| Position { line: m.line(), column: m.column() }),
            message,
            help,
        }
    }

    fn mapping<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n MarkedMappingNode> {
        match node {
            Node::Mapping(map) => Some(map),
            other => {
                self.error(
                    other.span(),
                    format!("{what} must be a mapping"),
                    Some(format!("write {what} as `key: value` lines indented under it")),
                );
                None
            }
        }
    }

    fn scalar<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n MarkedScalarNode> {
        match node {
            Node::Scalar(s) if !s.as_str().trim().is_empty() => Some(s),
            other => {
                self.error(other.span(), format!("{what} must be a single value"), None);
                None
            }
        }
    }

    /// Reports keys of `map` not in `allowed`, suggesting the closest allowed one.
    fn check_keys(&mut self, map: &MarkedMappingNode, allowed: &[&str], what: &str) {
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                let help = match closest(key.as_str(), allowed.iter().copied()) {
                    Some(near) => format!("did you mean `{near}`? {what} takes: {}", allowed.join(", ")),
                    None => format!("{what} takes: {}", allowed.join(", ")),
                };
                self.error(key.span(), format!("unknown field `{}` in {what}", key.as_str()), Some(help));
            }
        }
    }

    fn required<'n>(&mut self, map: &'n MarkedMappingNode, key: &str, what: &str, example: &str) -> Option<&'n Node> {
        let node = map.get_node(key);
        if node.is_none() {
            self.error(map.span(), format!("{what} has no `{key}`"), Some(format!("add e.g. `{key}: {example}`")));
        }
        node
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let scalar = self.scalar(node, what)?;
        match Duration::parse(scalar.as_str()) {
            Ok(d) => Some(d),
            Err(message) => {
                self.error(scalar.span(), format!("{what}: {message}"), None);
                None
            }
        }
    }

    fn definitions(&mut self, root: &Node) -> Definitions {
        let mut definitions = Definitions { file: self.file.clone(), sources: Vec::new(), features: Vec::new() };
        let Some(top) = self.mapping(root, "the file") else { return definitions };
        self.check_keys(top, &["sources", "features"], "the file");
        if let Some(sources) = self.required(top, "sources", "the file", "{ transactions: ... }")
            && let Some(sources) = self.mapping(sources, "`sources`")
        {
            for (name, node) in sources.iter() {
                if let Some(source) = self.source(name, node) {
                    definitions.sources.push(source);
                }
            }
        }
        if let Some(features) = self.required(top, "features", "the file", "{ user_velocity: ... }")
            && let Some(features) = self.mapping(features, "`features`")
        {
            for (name, node) in features.iter() {
                if let Some(feature) = self.feature(name, node, &definitions.sources) {
                    definitions.features.push(feature);
                }
            }
        }
        definitions
    }

    fn location(&mut self, node: &Node, what: &str, extra_keys: &[&str]) -> Option<Location> {
        let map = self.mapping(node, what)?;
        let mut allowed = vec!["delta", "parquet"];
        allowed.extend_from_slice(extra_keys);
        self.check_keys(map, &allowed, what);
        let delta = map.get_scalar("delta");
        let parquet = map.get_scalar("parquet");
        match (delta, parquet) {
            (Some(_), Some(p)) => {
                self.error(
                    p.span(),
                    format!("{what} names both `delta` and `parquet`"),
                    Some("keep one of them".to_string()),
                );
                None
            }
            (Some(d), None) => Some(Location::Delta(self.resolve(d.as_str()))),
            (None, Some(p)) => Some(Location::Parquet(self.resolve(p.as_str()))),
            (None, None) if extra_keys.is_empty() => {
                self.error(
                    map.span(),
                    format!("{what} names no table"),
                    Some("add `delta: path/to/table` or `parquet: path/to/files/`".to_string()),
                );
                None
            }
            (None, None) => None,
        }
    }

    /// Relative local paths are taken relative to the definitions file; URLs are kept.
    fn resolve(&self, path: &str) -> String {
        if path.contains("://") || Path::new(path).is_absolute() {
            path.to_string()
        } else {
            self.base.join(path).display().to_string()
        }
    }

    fn source(&mut self, name: &MarkedScalarNode, node: &Node) -> Option<Source> {
        let errors_before = self.errors.len();
        let source = self.source_fields(name, node);
        if self.errors.len() > errors_before {
            self.broken_sources.push(name.as_str().to_string());
        }
        source
    }

    fn source_fields(&mut self, name: &MarkedScalarNode, node: &Node) -> Option<Source> {
        let what = format!("source `{}`", name.as_str());
        let map = self.mapping(node, &what)?;
        self.check_keys(
            map,
            &[
                "schema",
                "event_time",
                "arrival_time",
                "history",
                "kafka",
                "watermark",
                "allowed_lateness",
                "idle_timeout",
            ],
            &what,
        );
        let mut schema = Vec::new();
        if let Some(columns) = self.required(map, "schema", &what, "{ user_id: string, event_time: timestamp }")
            && let Some(columns) = self.mapping(columns, &format!("the schema of {what}"))
        {
            for (column, type_node) in columns.iter() {
                let Some(type_name) = self.scalar(type_node, &format!("the type of column `{}`", column.as_str()))
                else {
                    continue;
                };
                match ValueType::parse(type_name.as_str()) {
                    Some(t) => schema.push((column.as_str().to_string(), t)),
                    None => {
                        let names: Vec<&str> = ValueType::ALL.iter().map(|t| t.name()).collect();
                        let synonym = match type_name.as_str().to_ascii_lowercase().as_str() {
                            "double" | "float" | "float32" | "real" | "decimal" => Some("float64"),
                            "int" | "integer" | "long" | "bigint" | "int32" => Some("int64"),
                            "str" | "text" | "varchar" | "utf8" => Some("string"),
                            "boolean" => Some("bool"),
                            "datetime" | "date" | "time" => Some("timestamp"),
                            _ => None,
                        };
                        let help = match synonym.or_else(|| closest(type_name.as_str(), names.iter().copied())) {
                            Some(near) => format!("did you mean `{near}`? types are: {}", names.join(" | ")),
                            None => format!("types are: {}", names.join(" | ")),
                        };
                        self.error(
                            type_name.span(),
                            format!("unknown type `{}` for column `{}`", type_name.as_str(), column.as_str()),
                            Some(help),
                        );
                    }
                }
            }
        }
        let columns: Vec<&str> = schema.iter().map(|(c, _)| c.as_str()).collect();
        let time_column = |parser: &mut Parser, key: &str| -> Option<String> {
            let scalar = parser.scalar(map.get_node(key)?, &format!("`{key}` of {what}"))?;
            let column = scalar.as_str().to_string();
            match schema.iter().find(|(c, _)| *c == column) {
                None => parser.unknown_column(scalar, &column, &columns, &what),
                Some((_, ValueType::Timestamp)) => {}
                Some((_, other)) => parser.error(
                    scalar.span(),
                    format!("`{key}` column `{column}` has type {}, not timestamp", other.name()),
                    Some(format!("declare `{column}: timestamp` in the schema, or name a timestamp column")),
                ),
            }
            Some(column)
        };
        if map.get_node("event_time").is_none() {
            self.error(
                map.span(),
                format!("{what} has no `event_time`"),
                Some("add `event_time: <a timestamp column of the schema>`".to_string()),
            );
        }
        let event_time = time_column(self, "event_time").unwrap_or_default();
        let arrival_time = time_column(self, "arrival_time");
        let history = map.get_node("history").and_then(|n| self.location(n, &format!("the history of {what}"), &[]));
        let kafka = map.get_node("kafka").and_then(|n| self.kafka(n, &what));
        let watermark = map.get_node("watermark").map_or(Some(Duration::ZERO), |n| self.duration(n, "watermark"));
        let allowed_lateness =
            map.get_node("allowed_lateness").map_or(Some(Duration::ZERO), |n| self.duration(n, "allowed_lateness"));
        let idle_timeout = match map.get_node("idle_timeout") {
            Some(n) => Some(self.duration(n, "idle_timeout")?),
            None => None,
        };
        Some(Source {
            name: name.as_str().to_string(),
            schema,
            event_time,
            arrival_time,
            history,
            kafka,
            watermark: watermark?,
            allowed_lateness: allowed_lateness?,
            idle_timeout,
        })
    }

    fn unknown_column(&mut self, at: &MarkedScalarNode, column: &str, columns: &[&str], owner: &str) {
        let help = match closest(column, columns.iter().copied()) {
            Some(near) => format!("did you mean `{near}`? {owner} has columns: {}", columns.join(", ")),
            None => format!("{owner} has columns: {}", columns.join(", ")),
        };
        self.error(at.span(), format!("unknown column `{column}`"), Some(help));
    }

    fn kafka(&mut self, node: &Node, owner: &str) -> Option<KafkaSource> {
        let what = format!("the kafka settings of {owner}");
        let map = self.mapping(node, &what)?;
        self.check_keys(map, &["topic", "format"], &what);
        let topic_node = self.required(map, "topic", &what, "transactions")?;
        let topic = self.scalar(topic_node, "`topic`")?.as_str().to_string();
        let format = match map.get_scalar("format") {
            Some(f) if f.as_str() != "json" => {
                self.error(
                    f.span(),
                    format!("unsupported format `{}`", f.as_str()),
                    Some("lockstep reads `format: json`".to_string()),
                );
                return None;
            }
            _ => "json".to_string(),
        };
        Some(KafkaSource { topic, format })
    }

    fn feature(&mut self, name: &MarkedScalarNode, node: &Node, sources: &[Source]) -> Option<FeatureSet> {
        let what = format!("feature set `{}`", name.as_str());
        let map = self.mapping(node, &what)?;
        self.check_keys(map, &["source", "key", "filter", "window", "aggregations", "serving_delay", "output"], &what);
        let source_node = self.required(map, "source", &what, "transactions")?;
        let source_name = self.scalar(source_node, "`source`")?;
        let Some(source) = sources.iter().find(|s| s.name == source_name.as_str()) else {
            let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
            let help = match closest(source_name.as_str(), names.iter().copied()) {
                Some(near) => format!("did you mean `{near}`? sources are: {}", names.join(", ")),
                None => format!("sources are: {}", names.join(", ")),
            };
            self.error(source_name.span(), format!("unknown source `{}`", source_name.as_str()), Some(help));
            return None;
        };
        let columns: Vec<&str> = source.schema.iter().map(|(c, _)| c.as_str()).collect();
        let source_what = format!("source `{}`", source.name);

        let mut key = Vec::new();
        if let Some(key_node) = self.required(map, "key", &what, "[user_id]") {
            let items: Vec<&Node> = match key_node {
                Node::Sequence(seq) => seq.iter().collect(),
                scalar @ Node::Scalar(_) => vec![scalar],
                other => {
                    self.error(
                        other.span(),
                        "`key` must be a list of columns".to_string(),
                        Some("write e.g. `key: [user_id]`".to_string()),
                    );
                    Vec::new()
                }
            };
            if items.is_empty() {
                self.error(
                    key_node.span(),
                    "`key` is empty".to_string(),
                    Some("name at least one key column, e.g. `key: [user_id]`".to_string()),
                );
            }
            for item in items {
                let Some(column) = self.scalar(item, "a key column") else { continue };
                if !columns.contains(&column.as_str()) {
                    self.unknown_column(column, column.as_str(), &columns, &source_what);
                } else if key.iter().any(|k| k == column.as_str()) {
                    self.error(
                        column.span(),
                        format!("key column `{}` is listed twice", column.as_str()),
                        Some("list each key column once".to_string()),
                    );
                } else {
                    key.push(column.as_str().to_string());
                }
            }
        }

        let (filter, filter_position) = match map.get_scalar("filter") {
            Some(f) => (Some(f.as_str().to_string()), Position::of(f.span())),
            None => (None, Position::default()),
        };
        let window = self.required(map, "window", &what, "{ sliding: 1h, every: 1m }").and_then(|n| self.window(n));

        let mut aggregations: Vec<AggregationDef> = Vec::new();
        if let Some(aggs) = self.required(map, "aggregations", &what, "{ tx_count: count(*) }")
            && let Some(aggs) = self.mapping(aggs, "`aggregations`")
        {
            if aggs.is_empty() {
                self.error(
                    aggs.span(),
                    "`aggregations` is empty".to_string(),
                    Some("add at least one, e.g. `tx_count: count(*)`".to_string()),
                );
            }
            for (agg_name, sql) in aggs.iter() {
                let reserved = ["window_start", "window_end"];
                if reserved.contains(&agg_name.as_str()) || key.iter().any(|k| k == agg_name.as_str()) {
                    self.error(agg_name.span(), format!("aggregation name `{}` clashes with an output column of the same name", agg_name.as_str()), Some("rename the aggregation: key columns, window_start and window_end are already output columns".to_string()));
                    continue;
                }
                let Some(sql) = self.scalar(sql, &format!("aggregation `{}`", agg_name.as_str())) else { continue };
                aggregations.push(AggregationDef {
                    name: agg_name.as_str().to_string(),
                    sql: sql.as_str().to_string(),
                    position: Position::of(sql.span()),
                });
            }
        }
        let serving_delay = match map.get_node("serving_delay") {
            Some(n) => self.duration(n, "serving_delay")?,
            None => source.watermark,
        };
        let output = match map.get_node("output") {
            Some(n) => self.output(n, &what)?,
            None => OutputDef::default(),
        };
        Some(FeatureSet {
            name: name.as_str().to_string(),
            source: source.name.clone(),
            key,
            filter,
            filter_position,
            window: window?,
            aggregations,
            serving_delay,
            output,
            position: Position::of(name.span()),
        })
    }

    fn output(&mut self, node: &Node, owner: &str) -> Option<OutputDef> {
        let what = format!("the output of {owner}");
        let table = self.location(node, &what, &["topic", "online"]);
        let map = node.as_mapping()?;
        Some(OutputDef {
            table,
            topic: map.get_scalar("topic").map(|s| s.as_str().to_string()),
            online: map.get_scalar("online").map(|s| s.as_str().to_string()),
        })
    }

    fn window(&mut self, node: &Node) -> Option<Window> {
        let map = self.mapping(node, "`window`")?;
        self.check_keys(map, &["sliding", "every", "tumbling", "session", "offset"], "`window`");
        let kinds: Vec<&str> =
            ["sliding", "tumbling", "session"].into_iter().filter(|k| map.get_node(k).is_some()).collect();
        if kinds.len() != 1 {
            self.error(
                map.span(),
                format!(
                    "`window` must be exactly one of sliding, tumbling or session (found {})",
                    if kinds.is_empty() { "none".to_string() } else { kinds.join(" and ") }
                ),
                Some("write e.g. `{ sliding: 1h, every: 1m }`, `{ tumbling: 1d }` or `{ session: 30m }`".to_string()),
            );
            return None;
        }
        let offset = match map.get_node("offset") {
            Some(n) => Some((self.duration(n, "offset")?, n)),
            None => None,
        };
        match kinds[0] {
            "session" => {
                if let Some((_, n)) = offset {
                    self.error(
                        n.span(),
                        "`offset` applies to sliding and tumbling windows, not sessions".to_string(),
                        Some("remove `offset`".to_string()),
                    );
                }
                if let Some(every) = map.get_node("every") {
                    self.error(
                        every.span(),
                        "`every` applies to sliding windows only".to_string(),
                        Some("remove `every`".to_string()),
                    );
                }
                let gap = self.duration(map.get_node("session")?, "session gap")?;
                if gap == Duration::ZERO {
                    self.error(map.span(), "the session gap must be longer than zero".to_string(), None);
                    return None;
                }
                Some(Window::Session { gap })
            }
            kind => {
                let size_node = map.get_node(kind)?;
                let size = self.duration(size_node, &format!("{kind} size"))?;
                let every = if kind == "tumbling" {
                    if let Some(every) = map.get_node("every") {
                        self.error(
                            every.span(),
                            "`every` applies to sliding windows; a tumbling window moves by its size".to_string(),
                            Some("remove `every`, or use `sliding:`".to_string()),
                        );
                    }
                    size
                } else {
                    match map.get_node("every") {
                        Some(n) => self.duration(n, "every")?,
                        None => {
                            self.error(
                                size_node.span(),
                                "a sliding window needs `every`".to_string(),
                                Some("add e.g. `every: 1m`, or use `tumbling:`".to_string()),
                            );
                            return None;
                        }
                    }
                };
                if size == Duration::ZERO || every == Duration::ZERO {
                    self.error(size_node.span(), "window size and `every` must be longer than zero".to_string(), None);
                    return None;
                }
                if size.millis() % every.millis() != 0 {
                    let smaller = Duration::from_millis(size.millis() / every.millis() * every.millis());
                    self.error(
                        size_node.span(),
                        format!("sliding size {size} is not a multiple of every {every}"),
                        Some(format!(
                            "make the size a whole number of `every` steps, e.g. {smaller} or {}",
                            Duration::from_millis(smaller.millis() + every.millis())
                        )),
                    );
                    return None;
                }
                let offset = match offset {
                    Some((o, n)) if o >= every => {
                        self.error(
                            n.span(),
                            format!("offset {o} is not shorter than the step {every}"),
                            Some(format!(
                                "an offset shifts windows within one step; use {}",
                                Duration::from_millis(o.millis() % every.millis())
                            )),
                        );
                        return None;
                    }
                    Some((o, _)) => o,
                    None => Duration::ZERO,
                };
                Some(Window::Sliding { size, every, offset })
            }
        }
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}
