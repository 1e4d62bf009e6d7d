//! Reading CPython bytecode for what it stores into: which instructions put
//! items into a named container (`CACHE[key] = v`, `VISITORS.append(v)`,
//! `self.cache.setdefault(k, [])`) or rebind a name (`TOTAL = TOTAL + [v]`).
//! The census asks this for the names of the roots that hold the memory,
//! so that an answer reads "CACHE, filled at app.py:34".
//!
//! The instructions come from the live process, so they are quickened
//! (3.11+ replaces instructions by specialised forms and keeps counters in
//! inline caches): `opcodes.rs` maps every form back to its base and says
//! how many cache units follow it, per minor version. The reader is
//! conservative: where the operand of a store cannot be followed back to a
//! name with the few stack effects it knows, it reports nothing.
mod opcodes;

/// The instructions the reader tells apart (every specialised form is its
/// base's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    LoadGlobal,
    LoadName,
    LoadFast,
    /// 3.13+: two locals at once (`oparg >> 4`, then `oparg & 15` on top).
    LoadFastPair,
    LoadConst,
    LoadAttr,
    LoadMethod,
    StoreSubscr,
    BinarySubscr,
    BinaryOperator,
    BuildTuple,
    StoreGlobal,
    StoreName,
    StoreAttr,
    StoreFast,
    ExtendedArg,
    Other,
}

/// One minor version's opcodes.
pub(crate) struct Opcodes {
    minor: u8,
    ops: [Op; 256],
    caches: [u8; 256],
    nb_subscr: Option<u32>,
}

impl Opcodes {
    /// The table of CPython 3.`minor`, if the reader knows it.
    pub(crate) fn for_minor(minor: u8) -> Option<Self> {
        let &(_, nb_subscr, rows) = opcodes::TABLES.iter().find(|t| t.0 == minor)?;
        let mut table = Self {
            minor,
            ops: [Op::Other; 256],
            caches: [0; 256],
            nb_subscr,
        };
        for &(number, op, caches) in rows {
            table.ops[number as usize] = op;
            table.caches[number as usize] = caches;
        }
        Some(table)
    }

    /// The instructions of `code` (2-byte code units, as in `co_code` or
    /// 3.11+'s `co_code_adaptive`), cache units skipped, `EXTENDED_ARG`s
    /// folded into the argument they extend.
    pub(crate) fn decode(&self, code: &[u8]) -> Vec<Instruction> {
        let mut out = Vec::with_capacity(code.len() / 2);
        let mut extended: u32 = 0;
        let mut unit = 0usize;
        let units = code.len() / 2;
        while unit < units {
            let opcode = code[unit * 2];
            let arg = extended << 8 | u32::from(code[unit * 2 + 1]);
            let op = self.ops[opcode as usize];
            let index = unit as u32;
            unit += 1 + self.caches[opcode as usize] as usize;
            if op == Op::ExtendedArg {
                extended = arg & 0x00ff_ffff;
                continue;
            }
            extended = 0;
            out.push(Instruction { index, op, arg });
        }
        out
    }

    /// What `instruction` loads by name, if anything.
    fn load(&self, instruction: &Instruction) -> Option<Named> {
        let arg = instruction.arg;
        Some(match instruction.op {
            Op::LoadGlobal if self.minor >= 11 => Named::Global(arg >> 1),
            Op::LoadGlobal | Op::LoadName => Named::Global(arg),
            Op::LoadFast => Named::Local(arg),
            Op::LoadFastPair => Named::Local(arg & 15),
            Op::LoadAttr if self.minor >= 12 => Named::Attribute(arg >> 1),
            Op::LoadAttr | Op::LoadMethod => Named::Attribute(arg),
            _ => return None,
        })
    }

    /// Values `instruction` leaves on the stack minus those it takes, for
    /// the instructions a subscript's key is usually built from; None for
    /// any other.
    fn stack_effect(&self, instruction: &Instruction) -> Option<i64> {
        let arg = instruction.arg;
        Some(match instruction.op {
            Op::LoadGlobal if self.minor >= 11 => 1 + i64::from(arg & 1),
            Op::LoadGlobal | Op::LoadName | Op::LoadFast | Op::LoadConst => 1,
            Op::LoadFastPair => 2,
            Op::LoadAttr if self.minor >= 12 => i64::from(arg & 1),
            Op::LoadAttr => 0,
            Op::LoadMethod => 1,
            Op::BinarySubscr => -1,
            Op::BinaryOperator => -1,
            Op::BuildTuple => 1 - i64::from(arg),
            _ => return None,
        })
    }

    fn is_subscript(&self, instruction: &Instruction) -> bool {
        match instruction.op {
            Op::BinarySubscr => true,
            Op::BinaryOperator => self.nb_subscr == Some(instruction.arg),
            _ => false,
        }
    }

    /// The instruction whose value the stack holds just below `end` (the
    /// first instruction computing the top value of `code[..end]`), when
    /// every instruction of that value has a known stack effect.
    fn value_start(&self, code: &[Instruction], end: usize) -> Option<usize> {
        let mut needed: i64 = 1;
        let mut at = end;
        // Keys are short: a name, a constant, a tuple of a few.
        for _ in 0..16 {
            at = at.checked_sub(1)?;
            needed -= self.stack_effect(&code[at])?;
            if needed == 0 {
                return Some(at);
            }
            if needed < 0 {
                return None;
            }
        }
        None
    }

    /// The named container whose value `code[producer]` leaves on the
    /// stack: a load by name, or an item of one (`CACHE[user].append(v)`
    /// fills CACHE), a few subscripts deep.
    fn container(&self, code: &[Instruction], producer: usize) -> Option<(usize, Named)> {
        let mut at = producer;
        for _ in 0..4 {
            let instruction = code.get(at)?;
            if let Some(named) = self.load(instruction) {
                return Some((at, named));
            }
            if !self.is_subscript(instruction) {
                return None;
            }
            // [container][key] SUBSCR: the container ends where the key
            // starts.
            let key = self.value_start(code, at)?;
            at = key.checked_sub(1)?;
        }
        None
    }

    /// Every store into a container or a name in `code`. `names` is
    /// `co_names`, `locals` the code's local names (None where a name could
    /// not be read); `MUTATORS` are the methods that count as filling.
    pub(crate) fn stores(
        &self,
        code: &[Instruction],
        names: &[Option<&str>],
        locals: &[Option<&str>],
    ) -> Vec<Store> {
        let text = |named: Named| -> Option<Target> {
            let name = |table: &[Option<&str>], i: u32| -> Option<String> {
                table.get(i as usize).copied().flatten().map(str::to_owned)
            };
            Some(match named {
                Named::Global(i) => Target::Global(name(names, i)?),
                Named::Local(i) => Target::Local(name(locals, i)?),
                Named::Attribute(i) => Target::Attribute(name(names, i)?),
            })
        };
        let mut out = Vec::new();
        for (at, instruction) in code.iter().enumerate() {
            let found = match instruction.op {
                Op::StoreSubscr => {
                    // [value][container][key] STORE_SUBSCR
                    self.value_start(code, at)
                        .and_then(|key| key.checked_sub(1))
                        .and_then(|producer| self.container(code, producer))
                        .map(|(load, named)| (load, named, How::Item))
                }
                Op::LoadAttr | Op::LoadMethod => {
                    let method = match self.load(instruction) {
                        Some(Named::Attribute(i)) => names.get(i as usize).copied().flatten(),
                        _ => None,
                    };
                    match method {
                        Some(method) if MUTATORS.contains(&method) => at
                            .checked_sub(1)
                            .and_then(|producer| self.container(code, producer))
                            .map(|(load, named)| (load, named, How::Method(method.to_owned()))),
                        _ => None,
                    }
                }
                Op::StoreGlobal | Op::StoreName => {
                    Some((at, Named::Global(instruction.arg), How::Rebind))
                }
                Op::StoreAttr => Some((at, Named::Attribute(instruction.arg), How::Rebind)),
                Op::StoreFast => Some((at, Named::Local(instruction.arg), How::Rebind)),
                _ => None,
            };
            if let Some((load, named, how)) = found
                && let Some(target) = text(named)
            {
                out.push(Store {
                    target,
                    index: code[load].index,
                    how,
                });
            }
        }
        out
    }
}

/// Methods that put items into the container they are called on.
pub(crate) const MUTATORS: &[&str] = &[
    "append",
    "extend",
    "insert",
    "add",
    "update",
    "setdefault",
    "appendleft",
    "extendleft",
    "__setitem__",
    "put",
    "put_nowait",
];

/// One decoded instruction: where it starts (in code units), its base
/// opcode, its full argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Instruction {
    pub index: u32,
    pub op: Op,
    pub arg: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Named {
    /// Index into `co_names`: a global (or a module-level name).
    Global(u32),
    /// Index into the locals.
    Local(u32),
    /// Index into `co_names`: an attribute.
    Attribute(u32),
}

/// What a store writes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    Global(String),
    Local(String),
    Attribute(String),
}

impl Target {
    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Global(name) | Self::Local(name) | Self::Attribute(name) => name,
        }
    }
}

/// How a store writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum How {
    /// `container[key] = value`
    Item,
    /// `container.append(value)` and the other `MUTATORS`
    Method(String),
    /// `name = value`, `obj.attr = value`
    Rebind,
}

impl How {
    /// `[key] =`, `.append()`, `=`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Item => "[key] =".into(),
            Self::Method(method) => format!(".{method}()"),
            Self::Rebind => "=".into(),
        }
    }
}

/// A store found in a code object: what, how, and the code unit of the
/// instruction naming the container (its line is the store's line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Store {
    pub target: Target,
    pub index: u32,
    pub how: How,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_has_a_table() {
        for minor in 8..=14 {
            assert!(Opcodes::for_minor(minor).is_some(), "3.{minor}");
        }
        assert!(Opcodes::for_minor(15).is_none());
    }

    /// Target memory is untrusted: arbitrary bytes decode and scan without
    /// panicking, into at most one instruction per code unit.
    #[test]
    fn arbitrary_bytes_decode_without_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for minor in 8..=14 {
            let opcodes = Opcodes::for_minor(minor).unwrap();
            for round in 0..200 {
                let code: Vec<u8> = (0..(round * 7 + 1))
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                let instructions = opcodes.decode(&code);
                assert!(instructions.len() <= code.len() / 2);
                let names = [Some("append"), None, Some("CACHE")];
                let stores = opcodes.stores(&instructions, &names, &names);
                assert!(stores.len() <= instructions.len());
            }
        }
    }

    /// 3.11's `CACHE[key] = value` in a function, quickened: LOAD_FAST
    /// value, LOAD_GLOBAL CACHE and its cache units, LOAD_FAST key,
    /// STORE_SUBSCR_DICT and its cache unit.
    #[test]
    fn a_quickened_item_store_names_its_container() {
        let opcodes = Opcodes::for_minor(11).unwrap();
        let number = |op: Op| {
            (0..=255u8)
                .find(|&n| opcodes.ops[n as usize] == op && opcodes.caches[n as usize] > 0)
                .or_else(|| (0..=255u8).find(|&n| opcodes.ops[n as usize] == op))
                .unwrap()
        };
        let (fast, global, store) = (
            number(Op::LoadFast),
            number(Op::LoadGlobal),
            number(Op::StoreSubscr),
        );
        let mut code = vec![fast, 1, global, 0];
        // Caches hold counters and versions: whatever they hold is skipped.
        code.extend(vec![0xa5u8; 2 * opcodes.caches[global as usize] as usize]);
        code.extend([fast, 0, store, 0]);
        code.extend(vec![0xa5u8; 2 * opcodes.caches[store as usize] as usize]);
        let instructions = opcodes.decode(&code);
        let stores = opcodes.stores(
            &instructions,
            &[Some("CACHE")],
            &[Some("key"), Some("value")],
        );
        assert_eq!(
            stores,
            vec![Store {
                target: Target::Global("CACHE".into()),
                index: 1,
                how: How::Item,
            }]
        );
    }
}
