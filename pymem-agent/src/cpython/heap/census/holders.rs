//! What holds the memory: a reference graph over the census's objects,
//! roots from `sys.modules` (module globals and class attributes), a
//! dominator tree, and retained sizes per root (what would be freed if the
//! root's reference were dropped), as Eclipse MAT and Chrome's heap
//! snapshots compute them.
//!
//! Referents are decoded per type: containers by their layout, instances
//! and GC-tracked types by their fields (what `tp_traverse` visits: every
//! field holding the address of a live object), numpy arrays by their
//! base. Other types are opaque: their own size counts, nothing behind
//! them is followed. Types, modules, module dicts, code objects and
//! interned strings are shared: the walk stops at them and never charges
//! them to a holder.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{
    Census, Kind, TPFLAGS_HAVE_GC, TPFLAGS_HEAPTYPE, TPFLAGS_MANAGED_DICT, TPFLAGS_TYPE_SUBCLASS,
};
use crate::cpython::heap::{HeapHolders, Holder};

/// `PyTypeObject.tp_dictoffset`.
const TP_DICTOFFSET: u64 = 288;
/// Roots reported, and children per level.
const MAX_ROOTS: usize = 200;
/// Children kept at each level below a root, and the roots that get
/// children at all: every census keeps its holders (a process keeps two
/// censuses), so the tree stays a few thousand entries.
const MAX_CHILDREN: [usize; DEPTH] = [8, 4, 3];
const ROOTS_WITH_CHILDREN: usize = 32;
/// Levels of children below each root.
const DEPTH: usize = 3;
/// Roots whose deep size is computed (a walk each), and the steps all of
/// those walks may take together.
const DEEP_ROOTS: usize = 64;
const DEEP_STEPS: u64 = 1 << 25;
/// The graph's bounds: past them the holders are not computed. The graph
/// and its dominator tree take about 70 bytes per object and 8 per edge on
/// top of the census (measured: 5.8 GiB peak for a 1.7 GiB copy of 30M
/// objects, 0.6 GiB for 0.18 GiB and 3M).
const MAX_EDGES: usize = 1 << 27;
const MAX_OBJECTS: usize = 12 << 20;
/// Static types without GC support that hold no references: not opaque.
const ATOMIC: &[&str] = &[
    "str",
    "int",
    "float",
    "bytes",
    "bool",
    "complex",
    "NoneType",
    "NotImplementedType",
    "ellipsis",
    "range",
    "bytearray",
];

/// Node flags.
const STOP: u8 = 1;
const OPAQUE: u8 = 2;

/// An edge label kind, for naming children.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Via {
    Item,
    Key,
    Value,
    Attribute(u64),
    Field,
    Indirect,
}

/// The reference graph in compressed rows: objects `0..n`, then one node per
/// root, then the virtual root that refers to every root.
struct Graph {
    address: Vec<u64>,
    weight: Vec<u64>,
    flags: Vec<u8>,
    offsets: Vec<u32>,
    targets: Vec<u32>,
}

impl Graph {
    fn successors(&self, node: u32) -> &[u32] {
        let node = node as usize;
        &self.targets[self.offsets[node] as usize..self.offsets[node + 1] as usize]
    }
}

/// Types the graph treats apart: shared ones (modules, code; types are
/// told by their flags) and C types decoded by their layout.
#[derive(Clone, Copy)]
struct KnownTypes {
    module: Option<u64>,
    code: Option<u64>,
    /// `functools._lru_cache_wrapper` and its cache's entries.
    lru_wrapper: Option<u64>,
    lru_entry: Option<u64>,
    deque: Option<u64>,
}

/// A named root: a module global, a class attribute, a frame local.
struct Root {
    name: String,
    object: u32,
    scope: Scope,
}

/// Where a root's name lives, for finding the code that stores into it.
#[derive(Clone, Debug)]
pub(super) enum Scope {
    /// A module global; `file` is the module's `__file__`, if it has one.
    Global { file: Option<String>, name: String },
    /// A class attribute, of a class defined in the module at `file`.
    ClassAttribute { file: Option<String>, name: String },
    /// A local of the frame running `code`.
    Local { code: u64, name: String },
}

impl Census<'_> {
    /// Finds the holders; never fails: what it cannot do, it says in
    /// `warnings`.
    pub(super) fn holders(&self) -> HeapHolders {
        let mut out = HeapHolders::default();
        if self.order.len() > MAX_OBJECTS {
            out.warnings.push(format!(
                "{} objects exceed the holders' budget of {MAX_OBJECTS}: holders not computed",
                self.order.len()
            ));
            return out;
        }
        let index = &self.counted;
        let Some(modules) = self.find_sys_modules() else {
            out.warnings
                .push("sys.modules not found in the copy: no module globals to start from".into());
            return out;
        };
        let by_name = |wanted: &str| {
            self.types.keys().copied().find(|&t| {
                self.image
                    .u64(t.wrapping_add(super::TP_NAME))
                    .and_then(|p| self.image.c_string(p, 64))
                    == Some(wanted)
            })
        };
        let shared = KnownTypes {
            module: self.target.static_type("PyModule_Type"),
            code: self.target.static_type("PyCode_Type"),
            lru_wrapper: by_name("functools._lru_cache_wrapper"),
            lru_entry: by_name("functools._lru_list_elem"),
            deque: by_name("collections.deque"),
        };
        let mut stop = vec![0u8; self.order.len()];
        let module_dicts = self.module_dicts(modules);
        for &(_, dict) in &module_dicts {
            if let Some(&i) = index.get(&dict) {
                stop[i as usize] |= STOP;
            }
        }
        let mut roots = self.roots(&module_dicts, index, shared);
        self.frame_roots(index, shared, &mut roots, &mut out.warnings);
        let Some(graph) = self.graph(index, stop, &roots, shared) else {
            out.warnings.push(format!(
                "the reference graph has more than {MAX_EDGES} edges: holders not computed"
            ));
            return out;
        };
        let n = graph.address.len();
        let virtual_root = (n - 1) as u32;
        let (order, idom) = dominators(&graph, virtual_root);
        let mut retained = graph.weight.clone();
        for &node in order.iter().rev() {
            let parent = idom[node as usize];
            if node != virtual_root && parent != u32::MAX {
                retained[parent as usize] += retained[node as usize];
            }
        }
        let objects = self.order.len();
        let reachable: u64 = order
            .iter()
            .filter(|&&node| (node as usize) < objects)
            .map(|&node| graph.weight[node as usize])
            .sum();
        let total: u64 = graph.weight[..objects].iter().sum();
        out.reachable_bytes = reachable;
        out.unreachable_bytes = total.saturating_sub(reachable);
        let children = dominator_children(&idom, &order);
        let mut names = TypeNames::default();
        let root_base = objects as u32;
        let mut holders: Vec<(u64, usize)> = roots
            .iter()
            .enumerate()
            .map(|(i, _)| (retained[root_base as usize + i], i))
            .filter(|&(bytes, _)| bytes > 0)
            .collect();
        holders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        holders.truncate(MAX_ROOTS);
        let tree = Tree {
            graph: &graph,
            children: &children,
            retained: &retained,
            known: shared,
        };
        let mut deep_steps = DEEP_STEPS;
        let mut mark = vec![0u32; n];
        for (rank, &(bytes, i)) in holders.iter().enumerate() {
            let root = &roots[i];
            let object = root.object;
            let deep = if rank < DEEP_ROOTS {
                deep_size(&graph, object, rank as u32 + 1, &mut mark, &mut deep_steps)
            } else {
                None
            };
            let type_addr = self.node_type[object as usize];
            let mut holder = Holder {
                name: root.name.clone(),
                type_name: names.get(self, type_addr),
                length: self.length(self.order[object as usize], type_addr, shared),
                count: 1,
                retained_bytes: bytes,
                deep_bytes: deep.unwrap_or(bytes).max(bytes),
                children: Vec::new(),
                writers: Vec::new(),
            };
            if rank < ROOTS_WITH_CHILDREN {
                holder.children = self.child_groups(&tree, &[object], DEPTH, &mut names);
            }
            out.holders.push(holder);
        }
        let scopes: Vec<&Scope> = holders.iter().map(|&(_, i)| &roots[i].scope).collect();
        self.attach_writers(&mut out.holders, &scopes);
        if deep_steps == 0 {
            out.warnings.push(
                "deep sizes stopped at their bound: some deep_bytes are only the retained bytes"
                    .into(),
            );
        }
        let mut opaque: HashMap<u64, u64> = HashMap::default();
        for (i, &flags) in graph.flags[..objects].iter().enumerate() {
            if flags & OPAQUE != 0 {
                *opaque.entry(self.node_type[i]).or_default() += graph.weight[i];
            }
        }
        let mut opaque: Vec<(u64, String)> = opaque
            .into_iter()
            .map(|(type_addr, bytes)| (bytes, names.get(self, type_addr)))
            .collect();
        opaque.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        out.opaque_types = opaque.into_iter().take(20).map(|(_, name)| name).collect();
        out
    }

    /// `sys.modules`: the dict whose values are module objects, most of
    /// them, with `builtins` and `sys` among its keys.
    fn find_sys_modules(&self) -> Option<u64> {
        let module_type = self.target.static_type("PyModule_Type")?;
        let mut best: Option<(usize, u64)> = None;
        for &obj in &self.order {
            let type_addr = self.type_of(obj).unwrap_or(0);
            if self.types.get(&type_addr).map(|t| t.kind) != Some(Kind::Dict) {
                continue;
            }
            // Cheap first: a dict of fewer than 8 entries is not it.
            if self.image.i64(obj.wrapping_add(16)).is_none_or(|n| n < 8) {
                continue;
            }
            let entries = self.dict_entries(obj);
            let modules = entries
                .iter()
                .filter(|&&(_, value)| self.image.u64(value.wrapping_add(8)) == Some(module_type))
                .count();
            if modules * 10 < entries.len() * 9 {
                continue;
            }
            let has = |name: &str| {
                entries
                    .iter()
                    .any(|&(key, _)| self.ascii_text(key) == Some(name))
            };
            if has("builtins") && has("sys") && best.is_none_or(|(n, _)| modules > n) {
                best = Some((modules, obj));
            }
        }
        best.map(|(_, dict)| dict)
    }

    /// Each module's name and dict (`md_dict`, the field after the head).
    fn module_dicts(&self, sys_modules: u64) -> Vec<(String, u64)> {
        let dict_type = self.target.static_type("PyDict_Type");
        self.dict_entries(sys_modules)
            .into_iter()
            .filter_map(|(key, module)| {
                let name = self.ascii_text(key)?;
                let dict = self.image.u64(module.wrapping_add(16))?;
                (self.image.u64(dict.wrapping_add(8)) == dict_type
                    && self.counted.contains_key(&dict))
                .then(|| (name.to_string(), dict))
            })
            .collect()
    }

    /// Module globals and the attributes of the classes they define, one
    /// root per object (an object bound to several names is one root, named
    /// after `__main__`'s name for it if it has one, else the first found).
    fn roots(
        &self,
        module_dicts: &[(String, u64)],
        index: &HashMap<u64, u32>,
        shared: KnownTypes,
    ) -> Vec<Root> {
        let mut roots: Vec<Root> = Vec::new();
        let mut by_object: HashMap<u32, usize> = HashMap::default();
        let mut classes_seen = HashSet::default();
        let mut add =
            |roots: &mut Vec<Root>, name: String, object: u32, scope: Scope, preferred: bool| {
                match by_object.get(&object) {
                    Some(&i) if preferred && !roots[i].name.starts_with("__main__.") => {
                        roots[i].name = name;
                        roots[i].scope = scope;
                    }
                    Some(_) => {}
                    None => {
                        by_object.insert(object, roots.len());
                        roots.push(Root {
                            name,
                            object,
                            scope,
                        });
                    }
                }
            };
        for (module, dict) in module_dicts {
            let main = module == "__main__";
            let file = self.module_file(*dict);
            for (key, value) in self.dict_entries(*dict) {
                let Some(name) = self.ascii_text(key) else {
                    continue;
                };
                if name.starts_with("__") && name.ends_with("__") {
                    continue;
                }
                let Some(&object) = index.get(&value) else {
                    continue;
                };
                if self.is_shared(value, shared) {
                    if self.is_class(value) && classes_seen.insert(value) {
                        let class_dict = self.image.u64(value.wrapping_add(super::TP_DICT));
                        for (attr_key, attr) in
                            class_dict.map(|d| self.dict_entries(d)).unwrap_or_default()
                        {
                            let Some(attr_name) = self.ascii_text(attr_key) else {
                                continue;
                            };
                            if attr_name.starts_with("__") && attr_name.ends_with("__") {
                                continue;
                            }
                            if let Some(&attr_object) = index.get(&attr)
                                && !self.is_shared(attr, shared)
                            {
                                add(
                                    &mut roots,
                                    format!("{module}.{name}.{attr_name}"),
                                    attr_object,
                                    Scope::ClassAttribute {
                                        file: file.clone(),
                                        name: attr_name.to_owned(),
                                    },
                                    main,
                                );
                            }
                        }
                    }
                    continue;
                }
                add(
                    &mut roots,
                    format!("{module}.{name}"),
                    object,
                    Scope::Global {
                        file: file.clone(),
                        name: name.to_owned(),
                    },
                    main,
                );
            }
        }
        roots
    }

    /// The locals of every thread's frames, named `thread N / function /
    /// local` (thread 1 is the oldest, the main thread). Objects a global
    /// already holds stay that global's.
    fn frame_roots(
        &self,
        index: &HashMap<u64, u32>,
        shared: KnownTypes,
        roots: &mut Vec<Root>,
        warnings: &mut Vec<String>,
    ) {
        let Some(offsets) = self.target.frames else {
            return;
        };
        let image = self.image;
        let minor = self.layout.minor;
        let held: HashSet<u32> = roots.iter().map(|r| r.object).collect();
        let mut added = HashSet::default();
        // The thread list's head (`_Py_DebugOffsets` says where, 3.13+;
        // before, the interpreter state's first KiB is searched): a pointer
        // to a thread state whose `interp` (prev, next, interp lead
        // every version's PyThreadState) points back and that has no prev.
        let offsets_to_try: Vec<u64> = match self.target.threads_head_offset {
            Some(offset) => vec![offset],
            None => (8..=1024u64).step_by(8).collect(),
        };
        let head = self
            .interpreter_candidates()
            .into_iter()
            .find_map(|interp| {
                offsets_to_try.iter().find_map(|&offset| {
                    let tstate = image.u64(interp.wrapping_add(offset))?;
                    (tstate != 0
                        && tstate % 8 == 0
                        && image.u64(tstate.wrapping_add(16)) == Some(interp)
                        && image.u64(tstate) == Some(0))
                    .then_some(tstate)
                })
            });
        let Some(head) = head else {
            warnings.push("no thread states found: frame locals are not roots".into());
            return;
        };
        // A list or a frame chain that loops (a damaged process) is
        // followed once: each thread state and frame is visited at most
        // once, so the work is bounded by the copy, not by laps times
        // locals.
        let mut threads = Vec::new();
        let mut seen_threads = HashSet::default();
        let mut at = head;
        while at != 0 && threads.len() < 4096 && seen_threads.insert(at) {
            threads.push(at);
            at = image.u64(at.wrapping_add(8)).unwrap_or(0);
        }
        if at != 0 {
            warnings.push("the thread list does not end: followed until it repeats".into());
        }
        let mut seen_frames = HashSet::default();
        let (localsplus, names_at) = match minor {
            ..=10 => (0, offsets.code.filename.wrapping_sub(32)),
            11..=13 => (72, offsets.code.filename.wrapping_sub(16)),
            _ => (80, offsets.code.filename.wrapping_sub(16)),
        };
        let tuple_type = self.target.static_type("PyTuple_Type");
        // Frame objects (3.8–3.10) keep their locals at their end.
        let frame_locals = self
            .target
            .static_type("PyFrame_Type")
            .and_then(|t| self.types.get(&t))
            .map_or(0, |t| t.basicsize.saturating_sub(8));
        for (n, &tstate) in threads.iter().rev().enumerate() {
            let Some(mut frame) = image.u64(tstate.wrapping_add(offsets.tstate_frame)) else {
                continue;
            };
            if offsets.cframe_frame != pymem_common::NO_OFFSET {
                frame = image
                    .u64(frame.wrapping_add(offsets.cframe_frame))
                    .unwrap_or(0);
            }
            for _ in 0..1024 {
                if frame == 0 || !seen_frames.insert(frame) {
                    break;
                }
                let owner = image
                    .u8(frame.wrapping_add(offsets.frame_owner))
                    .unwrap_or(0);
                let code = image
                    .u64(frame.wrapping_add(offsets.frame_code))
                    .unwrap_or(0)
                    & !7;
                let back = image
                    .u64(frame.wrapping_add(offsets.frame_back))
                    .unwrap_or(0);
                if u64::from(owner) < offsets.first_shim_owner
                    && let Some(function) = self
                        .ascii_text(image.u64(code.wrapping_add(offsets.code.name)).unwrap_or(0))
                    && let Some(names) = image.u64(code.wrapping_add(names_at))
                    && image.u64(names.wrapping_add(8)) == tuple_type
                {
                    let count = image
                        .i64(names.wrapping_add(16))
                        .unwrap_or(0)
                        .clamp(0, 1 << 16) as u64;
                    let base = if minor <= 10 {
                        frame + frame_locals
                    } else {
                        frame + localsplus
                    };
                    for i in 0..count {
                        let Some(name) = image
                            .u64(names + self.core.tuple_items + i * 8)
                            .and_then(|key| self.ascii_text(key))
                        else {
                            continue;
                        };
                        // 3.14 tags its stack references in the low bits.
                        let value = image.u64(base + i * 8).unwrap_or(0) & !3;
                        let Some(&object) = index.get(&value) else {
                            continue;
                        };
                        if held.contains(&object)
                            || self.is_shared(value, shared)
                            || !added.insert(object)
                        {
                            continue;
                        }
                        roots.push(Root {
                            name: format!("thread {} / {function} / {name}", n + 1),
                            object,
                            scope: Scope::Local {
                                code,
                                name: name.to_owned(),
                            },
                        });
                    }
                }
                frame = back;
            }
        }
    }

    /// An `lru_cache` wrapper's cache: its first field that is a dict (the
    /// wrapper's own `__dict__` comes after it in every version).
    fn lru_cache_dict(&self, obj: u64, info: &super::TypeInfo) -> Option<u64> {
        let bytes = self
            .image
            .bytes(obj.wrapping_add(16), info.basicsize.saturating_sub(16))?;
        bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .find(|&field| {
                self.type_of(field)
                    .and_then(|t| self.types.get(&t))
                    .is_some_and(|t| t.kind == Kind::Dict)
            })
    }

    /// The items of a `collections.deque`: blocks of 64 slots between a
    /// left and a right link, from `leftblock`/`leftindex`, `ob_size` of
    /// them.
    fn deque_items(&self, obj: u64, out: &mut Vec<(u64, Via)>) {
        const BLOCK: u64 = 64;
        let image = self.image;
        let (Some(len), Some(mut block), Some(index)) = (
            image.i64(obj.wrapping_add(16)),
            image.u64(obj.wrapping_add(24)),
            image.i64(obj.wrapping_add(40)),
        ) else {
            return;
        };
        if !(0..super::MAX_ITEMS as i64).contains(&len) || !(0..BLOCK as i64).contains(&index) {
            return;
        }
        let mut slot = index as u64;
        for _ in 0..len {
            let Some(item) = image.u64(block.wrapping_add(8 + slot * 8)) else {
                return;
            };
            out.push((item, Via::Item));
            slot += 1;
            if slot == BLOCK {
                slot = 0;
                match image.u64(block.wrapping_add(8 + BLOCK * 8)) {
                    Some(next) if next != 0 => block = next,
                    _ => return,
                }
            }
        }
    }

    fn is_class(&self, obj: u64) -> bool {
        let Some(type_addr) = self.type_of(obj) else {
            return false;
        };
        let Some(info) = self.types.get(&type_addr) else {
            return false;
        };
        info.flags & TPFLAGS_TYPE_SUBCLASS != 0
            && self
                .image
                .u64(obj.wrapping_add(super::TP_FLAGS))
                .is_some_and(|flags| flags & TPFLAGS_HEAPTYPE != 0)
    }

    /// Objects the walk stops at: types, modules, code, interned strings.
    fn is_shared(&self, obj: u64, shared: KnownTypes) -> bool {
        match self.type_of(obj) {
            Some(type_addr) => self.is_shared_of_type(obj, type_addr, shared),
            None => true,
        }
    }

    fn is_shared_of_type(&self, obj: u64, type_addr: u64, shared: KnownTypes) -> bool {
        let Some(info) = self.types.get(&type_addr) else {
            return true;
        };
        if info.flags & TPFLAGS_TYPE_SUBCLASS != 0 {
            return true;
        }
        if shared.module == Some(type_addr) || shared.code == Some(type_addr) {
            return true;
        }
        if info.kind == Kind::Str {
            // `state.interned`, the two lowest bits.
            return self
                .image
                .u32(obj.wrapping_add(32))
                .is_some_and(|s| s & 3 != 0);
        }
        false
    }

    /// `len()` of a container; of an `lru_cache` wrapper, its cache's.
    fn length(&self, obj: u64, type_addr: u64, known: KnownTypes) -> Option<u64> {
        if self.damaged.contains(&obj) {
            return None;
        }
        let info = self.types.get(&type_addr)?;
        if known.lru_wrapper == Some(type_addr) {
            let cache = self.lru_cache_dict(obj, info)?;
            return self.length(cache, self.type_of(cache).unwrap_or(0), known);
        }
        if known.deque == Some(type_addr) {
            return self
                .image
                .i64(obj.wrapping_add(16))
                .and_then(|n| u64::try_from(n).ok());
        }
        let at = match info.kind {
            Kind::List | Kind::Tuple | Kind::Dict => 16,
            Kind::Set => 24,
            _ => return None,
        };
        self.image
            .i64(obj.wrapping_add(at))
            .filter(|&n| n >= 0)
            .map(|n| n as u64)
    }

    fn graph(
        &self,
        index: &HashMap<u64, u32>,
        mut flags: Vec<u8>,
        roots: &[Root],
        shared: KnownTypes,
    ) -> Option<Graph> {
        let objects = self.order.len();
        for (i, &obj) in self.order.iter().enumerate() {
            if self.is_shared_of_type(obj, self.node_type[i], shared) {
                flags[i] |= STOP;
            }
        }
        let mut address = self.order.clone();
        let mut weight = Vec::with_capacity(objects + roots.len() + 1);
        let mut offsets = Vec::with_capacity(objects + roots.len() + 2);
        let mut targets: Vec<u32> = Vec::new();
        let mut refs = Vec::new();
        for (i, &obj) in self.order.iter().enumerate() {
            offsets.push(targets.len() as u32);
            let type_addr = self.type_of(obj).unwrap_or(0);
            let Some(info) = self.types.get(&type_addr) else {
                weight.push(0);
                continue;
            };
            if flags[i] & STOP != 0 {
                weight.push(0);
                continue;
            }
            weight.push(self.weight(obj, info));
            refs.clear();
            if !self.referents(obj, type_addr, info, shared, &mut refs) {
                flags[i] |= OPAQUE;
            }
            let start = targets.len();
            for &(referent, _) in &refs {
                if let Some(&node) = index.get(&referent)
                    && node as usize != i
                    && flags[node as usize] & STOP == 0
                {
                    targets.push(node);
                }
            }
            // Duplicates (a list holding one object twice) add nothing.
            targets[start..].sort_unstable();
            let mut kept = start;
            for j in start..targets.len() {
                if j == start || targets[j] != targets[kept - 1] {
                    targets[kept] = targets[j];
                    kept += 1;
                }
            }
            targets.truncate(kept);
            if targets.len() > MAX_EDGES {
                return None;
            }
        }
        for root in roots {
            offsets.push(targets.len() as u32);
            address.push(0);
            weight.push(0);
            flags.push(0);
            targets.push(root.object);
        }
        offsets.push(targets.len() as u32);
        address.push(0);
        weight.push(0);
        flags.push(0);
        targets.extend((0..roots.len()).map(|i| (objects + i) as u32));
        offsets.push(targets.len() as u32);
        Some(Graph {
            address,
            weight,
            flags,
            offsets,
            targets,
        })
    }

    /// An object's bytes: `sys.getsizeof`, plus the attribute values of an
    /// instance whose attributes live outside a dict (3.11+).
    fn weight(&self, obj: u64, info: &super::TypeInfo) -> u64 {
        let (size, _) = self.object_size(obj, info);
        let values = match self.layout.minor {
            11 if info.flags & TPFLAGS_MANAGED_DICT != 0 => self.image.u64(obj.wrapping_sub(32)),
            12 if info.flags & TPFLAGS_MANAGED_DICT != 0 => self
                .image
                .u64(obj.wrapping_sub(24))
                .filter(|tagged| tagged & 1 == 1)
                .map(|tagged| tagged.wrapping_add(1)),
            _ => None,
        };
        // 3.13+: the values live in the object's own block, after it.
        let inline = if self.layout.minor >= 13 && info.flags & super::TPFLAGS_INLINE_VALUES != 0 {
            let capacity = self
                .image
                .u8(obj.wrapping_add(info.basicsize))
                .map_or(0, u64::from);
            8 + capacity * 8
        } else {
            0
        };
        size + inline
            + values
                .filter(|&v| v != 0)
                .and_then(|v| self.block_size(v))
                .unwrap_or(0)
    }

    /// The referents of one object with the edge each one is, or false
    /// when its type is opaque.
    fn referents(
        &self,
        obj: u64,
        type_addr: u64,
        info: &super::TypeInfo,
        known: KnownTypes,
        out: &mut Vec<(u64, Via)>,
    ) -> bool {
        let image = self.image;
        let mut plain = Vec::new();
        if known.deque == Some(type_addr) {
            self.deque_items(obj, out);
        }
        match info.kind {
            Kind::List | Kind::Tuple | Kind::Set => {
                self.references(obj, type_addr, info, &mut plain);
                out.extend(plain.iter().map(|&r| (r, Via::Item)));
                plain.clear();
            }
            Kind::Dict => {
                for (key, value) in self.dict_entries(obj) {
                    out.push((key, Via::Key));
                    out.push((value, Via::Value));
                }
            }
            Kind::NdArray => {
                if let Some(base) = image.u64(obj.wrapping_add(48)) {
                    out.push((base, Via::Field));
                }
                return true;
            }
            Kind::Str | Kind::Int => return true,
            Kind::Other => {}
        }
        let heap = info.flags & TPFLAGS_HEAPTYPE != 0;
        let gc = info.flags & TPFLAGS_HAVE_GC != 0;
        if info.kind == Kind::Other && !heap && !gc && known.lru_entry != Some(type_addr) {
            let name = image
                .u64(type_addr.wrapping_add(super::TP_NAME))
                .and_then(|p| image.c_string(p, 64));
            return name.is_some_and(|n| ATOMIC.contains(&n));
        }
        // Instances: attributes kept without a dict object, and the dict
        // once there is one (3.11+: before the object).
        if info.flags & TPFLAGS_MANAGED_DICT != 0 {
            self.managed_values_named(obj, type_addr, info, out);
            if let Some(dict) = image.u64(obj.wrapping_sub(24))
                && dict & 1 == 0
            {
                out.push((dict, Via::Field));
            }
        } else if heap {
            // 3.8–3.10 (and classes without managed dicts): the instance
            // dict's values are the instance's attributes, named as 3.11+
            // names them (the dict itself stays a field).
            self.instance_dict_named(obj, type_addr, info, out);
        }
        // Fields: every word of the struct past what the container
        // decoding read that holds a live object's address.
        let from = match info.kind {
            Kind::Dict => 48,
            Kind::List => 40,
            Kind::Set => 200,
            Kind::Tuple => info.basicsize.max(24),
            _ => 16,
        };
        if info.basicsize > from
            && let Some(bytes) = image.bytes(obj.wrapping_add(from), info.basicsize - from)
        {
            for word in bytes.chunks_exact(8) {
                let value = u64::from_le_bytes(word.try_into().unwrap_or_default());
                if value != 0 && value % 8 == 0 && self.counted.contains_key(&value) {
                    out.push((value, Via::Field));
                }
            }
        }
        // (3.8–3.10 keep an instance's dict at `tp_dictoffset`: a field.)
        true
    }

    /// Managed attribute values with the attribute names from the class's
    /// cached keys, when they read.
    fn instance_dict_named(
        &self,
        obj: u64,
        type_addr: u64,
        info: &super::TypeInfo,
        out: &mut Vec<(u64, Via)>,
    ) {
        let Some(offset) = self.image.i64(type_addr.wrapping_add(TP_DICTOFFSET)) else {
            return;
        };
        if offset <= 0 || offset as u64 + 8 > info.basicsize {
            return;
        }
        let Some(dict) = self.image.u64(obj.wrapping_add(offset as u64)) else {
            return;
        };
        if dict == 0
            || self
                .types
                .get(&self.type_of(dict).unwrap_or(0))
                .map(|t| t.kind)
                != Some(Kind::Dict)
        {
            return;
        }
        for (key, value) in self.dict_entries(dict) {
            out.push((value, Via::Attribute(key)));
        }
    }

    fn managed_values_named(
        &self,
        obj: u64,
        type_addr: u64,
        info: &super::TypeInfo,
        out: &mut Vec<(u64, Via)>,
    ) {
        let mut values = Vec::new();
        self.managed_values(obj, type_addr, info, &mut values);
        let names: Vec<u64> = self.cached_key_names(type_addr);
        for (i, value) in values.into_iter().enumerate() {
            let via = names.get(i).map_or(Via::Field, |&key| Via::Attribute(key));
            out.push((value, via));
        }
    }

    /// The keys of a class's shared (cached) keys, in order.
    fn cached_key_names(&self, type_addr: u64) -> Vec<u64> {
        let Some(offset) = self.ht_name_offset.map(|o| o + 24) else {
            return Vec::new();
        };
        let Some(keys) = self.image.u64(type_addr.wrapping_add(offset)) else {
            return Vec::new();
        };
        let Some((entries, n, entry, key_at, _)) = self.dict_table(keys) else {
            return Vec::new();
        };
        let Some(table) = self.image.bytes(entries, n * entry) else {
            return Vec::new();
        };
        (0..n)
            .map(|i| {
                let at = (i * entry + key_at) as usize;
                table
                    .get(at..at + 8)
                    .map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            })
            .collect()
    }

    /// The size of the pymalloc block `addr` starts, from its pool's header.
    pub(super) fn block_size(&self, addr: u64) -> Option<u64> {
        if !self.in_pool(addr) {
            return None;
        }
        let pool = addr & !(self.layout.pool_size - 1);
        let size_index = self.image.u32(pool.wrapping_add(36))?;
        (size_index < 64).then(|| (u64::from(size_index) + 1) * 16)
    }

    /// The children of a group of objects in the dominator tree, grouped by
    /// the edge from their parent and their type, heaviest first.
    fn child_groups(
        &self,
        tree: &Tree<'_>,
        parents: &[u32],
        depth: usize,
        names: &mut TypeNames,
    ) -> Vec<Holder> {
        let Tree {
            graph,
            children,
            retained,
            known,
        } = *tree;
        if depth == 0 {
            return Vec::new();
        }
        let objects = self.order.len() as u32;
        // (edge, type) -> (retained bytes, members)
        let mut groups: HashMap<(Via, u64), (u64, Vec<u32>)> = HashMap::default();
        let mut refs = Vec::new();
        for &parent in parents {
            let kids = children.of(parent);
            if kids.is_empty() || parent >= objects {
                continue;
            }
            let obj = self.order[parent as usize];
            let type_addr = self.type_of(obj).unwrap_or(0);
            refs.clear();
            if let Some(info) = self.types.get(&type_addr) {
                self.referents(obj, type_addr, info, known, &mut refs);
            }
            // Most parents have a few referents: a scan beats a map.
            let via_of: Option<HashMap<u64, Via>> =
                (refs.len() > 16).then(|| refs.iter().map(|&(r, via)| (r, via)).collect());
            let via_for = |addr: u64| match &via_of {
                Some(map) => map.get(&addr).copied(),
                None => refs.iter().find(|&&(r, _)| r == addr).map(|&(_, via)| via),
            };
            for &kid in kids {
                if kid >= objects {
                    continue;
                }
                let kid_addr = graph.address[kid as usize];
                let via = via_for(kid_addr).unwrap_or(Via::Indirect);
                let kid_type = self.type_of(kid_addr).unwrap_or(0);
                let group = groups.entry((via, kid_type)).or_default();
                group.0 += retained[kid as usize];
                group.1.push(kid);
            }
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|(_, (bytes, _))| std::cmp::Reverse(*bytes));
        groups.truncate(MAX_CHILDREN[DEPTH - depth]);
        groups
            .into_iter()
            .map(|((via, type_addr), (bytes, members))| Holder {
                name: self.via_name(via),
                type_name: names.get(self, type_addr),
                length: None,
                count: members.len() as u64,
                retained_bytes: bytes,
                deep_bytes: bytes,
                children: self.child_groups(tree, &members, depth - 1, names),
                writers: Vec::new(),
            })
            .collect()
    }

    fn via_name(&self, via: Via) -> String {
        match via {
            Via::Item => "[*]".into(),
            Via::Key => "keys".into(),
            Via::Value => "values".into(),
            Via::Attribute(key) => self
                .ascii_text(key)
                .map_or_else(|| "fields".into(), |name| format!(".{name}")),
            Via::Field => "fields".into(),
            Via::Indirect => "(through others)".into(),
        }
    }
}

/// The dominator tree and what the children's grouping reads of it.
#[derive(Clone, Copy)]
struct Tree<'g> {
    graph: &'g Graph,
    children: &'g DominatorChildren,
    retained: &'g [u64],
    known: KnownTypes,
}

/// Type names, computed once per type.
#[derive(Default)]
struct TypeNames(HashMap<u64, String>);

impl TypeNames {
    fn get(&mut self, census: &Census<'_>, type_addr: u64) -> String {
        self.0
            .entry(type_addr)
            .or_insert_with(|| census.type_name(type_addr, &mut Vec::new()))
            .clone()
    }
}

/// Dominator-tree children in compressed rows.
struct DominatorChildren {
    offsets: Vec<u32>,
    nodes: Vec<u32>,
}

impl DominatorChildren {
    fn of(&self, node: u32) -> &[u32] {
        let node = node as usize;
        &self.nodes[self.offsets[node] as usize..self.offsets[node + 1] as usize]
    }
}

fn dominator_children(idom: &[u32], order: &[u32]) -> DominatorChildren {
    let (offsets, nodes) = compressed_rows(idom.len(), || {
        order.iter().filter_map(|&node| {
            let parent = idom[node as usize];
            (parent != u32::MAX && parent != node).then_some((parent, node))
        })
    });
    DominatorChildren { offsets, nodes }
}

/// Compressed rows of `n` rows from `(row, value)` pairs, which `pairs`
/// lists twice: once to count, once to fill.
fn compressed_rows<I: Iterator<Item = (u32, u32)>>(
    n: usize,
    pairs: impl Fn() -> I,
) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; n + 1];
    for (row, _) in pairs() {
        counts[row as usize + 1] += 1;
    }
    for i in 0..n {
        counts[i + 1] += counts[i];
    }
    let offsets = counts.clone();
    let mut fill = counts;
    let mut values = vec![0u32; offsets[n] as usize];
    for (row, value) in pairs() {
        values[fill[row as usize] as usize] = value;
        fill[row as usize] += 1;
    }
    (offsets, values)
}

/// Everything reachable from `start`, in bytes; None once the shared step
/// budget runs out.
fn deep_size(
    graph: &Graph,
    start: u32,
    epoch: u32,
    mark: &mut [u32],
    steps: &mut u64,
) -> Option<u64> {
    let mut stack = vec![start];
    mark[start as usize] = epoch;
    let mut bytes = 0;
    while let Some(node) = stack.pop() {
        if *steps == 0 {
            return None;
        }
        *steps -= 1;
        bytes += graph.weight[node as usize];
        for &next in graph.successors(node) {
            if mark[next as usize] != epoch {
                mark[next as usize] = epoch;
                stack.push(next);
            }
        }
    }
    Some(bytes)
}

/// Immediate dominators from `root` (Cooper, Harvey and Kennedy's
/// iterative algorithm over reverse postorder), on compressed rows rather
/// than a general graph library's maps: millions of objects must fit in a
/// few hundred MiB. Returns the reverse postorder of the reachable nodes
/// and each node's immediate dominator (`u32::MAX`: unreachable).
fn dominators(graph: &Graph, root: u32) -> (Vec<u32>, Vec<u32>) {
    let n = graph.address.len();
    // Iterative depth-first postorder.
    let mut postorder_number = vec![u32::MAX; n];
    let mut postorder = Vec::new();
    let mut visited = vec![false; n];
    let mut stack: Vec<(u32, u32)> = vec![(root, 0)];
    visited[root as usize] = true;
    while let Some(&mut (node, ref mut next)) = stack.last_mut() {
        let successors = graph.successors(node);
        if let Some(&child) = successors.get(*next as usize) {
            *next += 1;
            if !visited[child as usize] {
                visited[child as usize] = true;
                stack.push((child, 0));
            }
        } else {
            postorder_number[node as usize] = postorder.len() as u32;
            postorder.push(node);
            stack.pop();
        }
    }
    drop(visited);
    // Predecessors of reachable nodes, in compressed rows.
    let (pred_offsets, preds) = compressed_rows(n, || {
        postorder
            .iter()
            .flat_map(|&node| graph.successors(node).iter().map(move |&succ| (succ, node)))
    });
    let mut idom = vec![u32::MAX; n];
    idom[root as usize] = root;
    let reverse: Vec<u32> = postorder.iter().rev().copied().collect();
    let intersect = |idom: &[u32], mut a: u32, mut b: u32| {
        while a != b {
            while postorder_number[a as usize] < postorder_number[b as usize] {
                a = idom[a as usize];
            }
            while postorder_number[b as usize] < postorder_number[a as usize] {
                b = idom[b as usize];
            }
        }
        a
    };
    let mut changed = true;
    while changed {
        changed = false;
        for &node in reverse.iter().skip(1) {
            let from = pred_offsets[node as usize] as usize;
            let to = pred_offsets[node as usize + 1] as usize;
            let mut new_idom = u32::MAX;
            for &pred in &preds[from..to] {
                if idom[pred as usize] == u32::MAX {
                    continue;
                }
                new_idom = if new_idom == u32::MAX {
                    pred
                } else {
                    intersect(&idom, pred, new_idom)
                };
            }
            if new_idom != u32::MAX && idom[node as usize] != new_idom {
                idom[node as usize] = new_idom;
                changed = true;
            }
        }
    }
    (reverse, idom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[&[u32]]) -> Graph {
        let mut offsets = vec![0];
        let mut targets = Vec::new();
        for succ in edges {
            targets.extend_from_slice(succ);
            offsets.push(targets.len() as u32);
        }
        Graph {
            address: vec![0; edges.len()],
            weight: vec![1; edges.len()],
            flags: vec![0; edges.len()],
            offsets,
            targets,
        }
    }

    #[test]
    fn dominators_of_a_diamond_and_a_cycle() {
        // 0 -> 1, 2; 1 -> 3; 2 -> 3; 3 -> 4; 4 -> 3 (cycle); 5 unreachable.
        let g = graph(&[&[1, 2], &[3], &[3], &[4], &[3], &[]]);
        let (order, idom) = dominators(&g, 0);
        assert_eq!(order[0], 0);
        assert_eq!(idom[1], 0);
        assert_eq!(idom[2], 0);
        assert_eq!(idom[3], 0, "3 is reached through 1 and 2");
        assert_eq!(idom[4], 3);
        assert_eq!(idom[5], u32::MAX);
        assert_eq!(order.len(), 5);
    }

    #[test]
    fn dominator_children_group_by_parent() {
        let g = graph(&[&[1, 2], &[3], &[], &[]]);
        let (order, idom) = dominators(&g, 0);
        let children = dominator_children(&idom, &order);
        let mut of_root = children.of(0).to_vec();
        of_root.sort();
        assert_eq!(of_root, vec![1, 2]);
        assert_eq!(children.of(1), &[3]);
        assert!(children.of(3).is_empty());
    }
}
