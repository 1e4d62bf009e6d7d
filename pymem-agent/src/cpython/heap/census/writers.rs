//! Which lines fill a holder: the stores into a root's name (or an
//! attribute on its way down) found in the bytecode of the process's live
//! code objects, read from the copy.
use rustc_hash::FxHashSet as HashSet;

use super::{Census, holders::Scope};
use crate::cpython::heap::{Holder, Writer};
use crate::cpython::{
    bytecode::{How, Opcodes, Store, Target},
    linetable,
    offsets::LineFormat,
};

/// Bounds on the code read: names per tuple, code units per code object,
/// units over the whole census, bytes of one line table.
const MAX_NAMES: u64 = 1 << 12;
const MAX_UNITS: u64 = 1 << 20;
const MAX_TOTAL_UNITS: u64 = 1 << 26;
const MAX_LINE_TABLE: u64 = 1 << 20;

/// The static types a code object's fields are checked against.
#[derive(Clone, Copy)]
struct SequenceTypes {
    tuple: Option<u64>,
    bytes: Option<u64>,
}

/// One store found in a code object, with its place in the source.
#[derive(Clone, Debug)]
pub(super) struct CodeStore {
    /// The code object's address (a frame local's writers are its own
    /// frame's code).
    pub code: u64,
    pub target: Target,
    pub how: How,
    pub function: String,
    pub file: String,
    pub line: i64,
}

impl Census<'_> {
    /// The stores into any of `wanted` (names of globals, attributes and
    /// locals) in every code object of the copy.
    pub(super) fn stores_into(&self, wanted: &HashSet<&str>) -> Vec<CodeStore> {
        let (Some(frames), Some(code_type)) =
            (self.target.frames, self.target.static_type("PyCode_Type"))
        else {
            return Vec::new();
        };
        let Some(opcodes) = Opcodes::for_minor(self.layout.minor) else {
            return Vec::new();
        };
        if wanted.is_empty() {
            return Vec::new();
        }
        let offsets = frames.code;
        // Looked up once: every code object reads two tuples and a bytes.
        let types = SequenceTypes {
            tuple: self.target.static_type("PyTuple_Type"),
            bytes: self.target.static_type("PyBytes_Type"),
        };
        let mut budget = MAX_TOTAL_UNITS;
        let mut out = Vec::new();
        for (i, &code) in self.order.iter().enumerate() {
            if self.node_type[i] != code_type || budget == 0 {
                continue;
            }
            let image = self.image;
            let names = self.name_tuple(image.u64(code.wrapping_add(offsets.names)), types);
            let locals = self.name_tuple(image.u64(code.wrapping_add(offsets.locals)), types);
            if !names
                .iter()
                .chain(&locals)
                .any(|n| n.is_some_and(|n| wanted.contains(n)))
            {
                continue;
            }
            let Some(bytecode) =
                self.bytecode(code, offsets.bytecode, offsets.code_adaptive, types)
            else {
                continue;
            };
            budget = budget.saturating_sub(bytecode.len() as u64 / 2);
            let instructions = opcodes.decode(bytecode);
            let stores: Vec<Store> = opcodes
                .stores(&instructions, &names, &locals)
                .into_iter()
                .filter(|s| wanted.contains(s.target.name()))
                .collect();
            if stores.is_empty() {
                continue;
            }
            let text = |at: u64| {
                image
                    .u64(code.wrapping_add(at))
                    .and_then(|s| self.ascii_text(s))
                    .unwrap_or("<unknown>")
                    .to_owned()
            };
            let first_line = i64::from(
                image
                    .i32(code.wrapping_add(offsets.first_line))
                    .unwrap_or(0),
            );
            let table = image
                .u64(code.wrapping_add(offsets.line_table))
                .and_then(|t| self.bytes_payload(t, MAX_LINE_TABLE, types))
                .unwrap_or(&[]);
            for store in stores {
                let unit = u64::from(store.index);
                let line = match offsets.format {
                    LineFormat::Lnotab => linetable::line_from_lnotab(table, first_line, unit * 2),
                    LineFormat::Linetable310 => {
                        linetable::line_from_linetable_310(table, first_line, unit * 2)
                    }
                    LineFormat::Locations => {
                        linetable::line_from_locations(table, first_line, unit)
                    }
                };
                out.push(CodeStore {
                    code,
                    target: store.target,
                    how: store.how,
                    function: text(offsets.name),
                    file: text(offsets.filename),
                    line: line.unwrap_or(first_line),
                });
            }
        }
        out
    }

    /// The ASCII names of a tuple of `str` (None for any other item);
    /// empty if `tuple` is not a tuple.
    fn name_tuple(&self, tuple: Option<u64>, types: SequenceTypes) -> Vec<Option<&str>> {
        let image = self.image;
        let Some(tuple) = tuple else {
            return Vec::new();
        };
        if types.tuple.is_none() || image.u64(tuple.wrapping_add(8)) != types.tuple {
            return Vec::new();
        }
        let count = image
            .i64(tuple.wrapping_add(16))
            .unwrap_or(0)
            .clamp(0, MAX_NAMES as i64) as u64;
        (0..count)
            .map(|i| {
                image
                    .u64(tuple + self.core.tuple_items + i * 8)
                    .and_then(|s| self.ascii_text(s))
            })
            .collect()
    }

    /// A code object's instructions: `co_code`'s payload (3.8–3.10) or the
    /// `ob_size` code units inline at `adaptive` (3.11+).
    fn bytecode(
        &self,
        code: u64,
        co_code: u64,
        adaptive: u64,
        types: SequenceTypes,
    ) -> Option<&[u8]> {
        if co_code != 0 {
            let bytes = self.image.u64(code.wrapping_add(co_code))?;
            return self.bytes_payload(bytes, MAX_UNITS * 2, types);
        }
        let units = self.image.i64(code.wrapping_add(16))?;
        if !(0..=MAX_UNITS as i64).contains(&units) {
            return None;
        }
        self.image
            .bytes(code.wrapping_add(adaptive), units as u64 * 2)
    }

    /// A `bytes` object's payload, if it is one of at most `max` bytes.
    fn bytes_payload(&self, bytes: u64, max: u64, types: SequenceTypes) -> Option<&[u8]> {
        if self.image.u64(bytes.wrapping_add(8))? != types.bytes? {
            return None;
        }
        let size = self.image.i64(bytes.wrapping_add(16))?;
        if !(0..=max as i64).contains(&size) {
            return None;
        }
        self.image.bytes(bytes.wrapping_add(32), size as u64)
    }
}

/// Roots whose writers are looked for, and writers kept per root.
const WRITER_ROOTS: usize = 50;
const WRITERS_PER_ROOT: usize = 8;

impl Scope {
    fn name(&self) -> &str {
        match self {
            Self::Global { name, .. }
            | Self::ClassAttribute { name, .. }
            | Self::Local { name, .. } => name,
        }
    }

    fn file(&self) -> Option<&str> {
        match self {
            Self::Global { file, .. } | Self::ClassAttribute { file, .. } => file.as_deref(),
            Self::Local { .. } => None,
        }
    }

    /// Whether `store` writes to this root's own name.
    fn is_written_by(&self, store: &CodeStore) -> bool {
        match (self, &store.target) {
            (Self::Global { file, name }, Target::Global(target)) => {
                target == name
                    && match file {
                        Some(file) => &store.file == file,
                        // `python -c`, `<stdin>`: code that is no file's.
                        None => store.file.starts_with('<'),
                    }
            }
            (Self::ClassAttribute { name, .. }, Target::Attribute(target)) => target == name,
            (Self::Local { code, name }, Target::Local(target)) => {
                *code == store.code && target == name
            }
            _ => false,
        }
    }
}

/// The attributes down a root's heaviest path that each hold at least half
/// of their parent (`service` -> `.cache`), outermost first; instance
/// dicts are passed through.
fn attribute_chain(holder: &Holder) -> Vec<String> {
    let mut chain = Vec::new();
    let mut node = holder;
    while let Some(child) = node.children.first() {
        if child.retained_bytes.saturating_mul(2) < node.retained_bytes {
            break;
        }
        match child.name.strip_prefix('.') {
            Some("__dict__") => {}
            Some(attr) => chain.push(attr.to_owned()),
            None => break,
        }
        node = child;
    }
    chain
}

impl Census<'_> {
    /// `__file__` of the module whose dict is `dict`.
    pub(super) fn module_file(&self, dict: u64) -> Option<String> {
        self.dict_entries(dict)
            .into_iter()
            .find_map(|(key, value)| {
                (self.ascii_text(key) == Some("__file__"))
                    .then(|| self.ascii_text(value).map(str::to_owned))
                    .flatten()
            })
    }

    /// Fills the first roots' `writers`: stores into the deepest attribute
    /// of their heaviest path first, then into the root's own name; item
    /// stores and filling methods before plain rebinding, which only
    /// counts when nothing fills the root.
    pub(super) fn attach_writers(&self, holders: &mut [Holder], scopes: &[&Scope]) {
        let shown = holders.len().min(scopes.len()).min(WRITER_ROOTS);
        let chains: Vec<Vec<String>> = holders[..shown].iter().map(attribute_chain).collect();
        let mut wanted: HashSet<&str> = HashSet::default();
        for (scope, chain) in scopes.iter().zip(&chains) {
            wanted.insert(scope.name());
            wanted.extend(chain.iter().map(String::as_str));
        }
        let stores = self.stores_into(&wanted);
        for (i, holder) in holders[..shown].iter_mut().enumerate() {
            holder.writers = pick_writers(scopes[i], &chains[i], &stores);
        }
    }
}

/// Stores in the root's own module's file, if any are; all of them if not.
fn same_file_first<'s>(scope: &Scope, mut found: Vec<&'s CodeStore>) -> Vec<&'s CodeStore> {
    if let Some(file) = scope.file()
        && found.iter().any(|s| s.file == file)
    {
        found.retain(|s| s.file == file);
    }
    found
}

fn pick_writers(scope: &Scope, chain: &[String], stores: &[CodeStore]) -> Vec<Writer> {
    let mut groups: Vec<Vec<&CodeStore>> = Vec::new();
    for attr in chain.iter().rev() {
        groups.push(same_file_first(
            scope,
            stores
                .iter()
                .filter(|s| matches!(&s.target, Target::Attribute(a) if a == attr))
                .collect(),
        ));
    }
    groups.push(same_file_first(
        scope,
        stores.iter().filter(|s| scope.is_written_by(s)).collect(),
    ));
    // Module-level code runs once, at import (`CACHE = {}`): its stores
    // count only where no function stores into the same holder.
    for group in &mut groups {
        if group.iter().any(|s| s.function != "<module>") {
            group.retain(|s| s.function != "<module>");
        }
    }
    let filling = groups
        .iter()
        .map(|g| {
            g.iter()
                .copied()
                .filter(|s| s.how != How::Rebind)
                .collect::<Vec<_>>()
        })
        .find(|g| !g.is_empty());
    let chosen = filling.unwrap_or_else(|| {
        groups
            .into_iter()
            .find(|g| !g.is_empty())
            .unwrap_or_default()
    });
    let mut seen = HashSet::default();
    chosen
        .into_iter()
        .filter(|s| seen.insert((s.file.as_str(), s.line)))
        .take(WRITERS_PER_ROOT)
        .map(|s| Writer {
            function: s.function.clone(),
            file: s.file.clone(),
            line: s.line,
            store: describe(s),
        })
        .collect()
}

/// The store as source: `CACHE[key] =`, `VISITORS.append()`, `.cache =`.
fn describe(store: &CodeStore) -> String {
    let name = match &store.target {
        Target::Attribute(attr) => format!(".{attr}"),
        Target::Global(name) | Target::Local(name) => name.clone(),
    };
    match &store.how {
        How::Rebind => format!("{name} ="),
        how => format!("{name}{}", how.describe()),
    }
}
