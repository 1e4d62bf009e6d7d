#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (fuzz/seeds/<target>/) from the real
interpreters on this machine: pyenv's 3.8+ under ~/.pyenv/versions, Debian's
/usr/bin/python3.11 and the Debian root filesystems' pythons under
.cache/rootfs (those that exist).

    python3 fuzz/seeds.py            # every target but census
    python3 fuzz/seeds.py dump       # (run under each interpreter by the above)

The census seeds need a live process and the agent: see census_seed.rs.

The input formats are those of pymem-agent/src/fuzzing.rs. ELF seeds are
the interpreters' binaries cut down to what the analysis reads (dynamic
symbols and relocations, the PLT, notes, and small windows of code and
data at the symbols it looks at), so that each is tens of KiB, not tens of
MiB. Each seed is named by the SHA-1 of its bytes, as libFuzzer names its
corpus files.
"""
import base64
import glob
import hashlib
import json
import os
import re
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")

# fuzzing.rs: FAKE_POINTER_TAG, and how a version is selected (8 + b % 7).
FAKE_POINTER_TAG = 0xFA4E << 48


def minor_selector(minor):
    return bytes([minor - 8])


# ---------------------------------------------------------------- dump mode
# Runs under each interpreter: its own code objects, read from its memory.


def sample_code_objects():
    """Code objects of several shapes: this module's, a warmed-up loop
    (specialised on 3.11+), and some of the standard library's."""
    import collections
    import json as json_module
    import textwrap

    cache = {}

    def warm(n):
        total = 0
        for i in range(n):
            cache[i % 7] = [i, str(i)]
            total += len(cache) + i * 2
            if total > 10**9:
                raise ValueError("never")
        return total

    for _ in range(200):
        warm(50)
    codes = [warm.__code__, sample_code_objects.__code__]
    for module in (json_module.decoder, textwrap, collections):
        for value in vars(module).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                codes.append(code)
    seen, unique = set(), []
    for code in codes:
        if id(code) not in seen:
            seen.add(id(code))
            unique.append(code)
    unique.sort(key=lambda c: len(c.co_code))
    # Small, middling and the largest.
    step = max(1, len(unique) // 10)
    return unique[::step][:12] + unique[-2:]


def line_table_of(code):
    minor = sys.version_info[1]
    return code.co_lnotab if minor <= 9 else code.co_linetable


def adaptive_code(code):
    """The instructions as the process runs them: co_code up to 3.10,
    co_code_adaptive (specialised) from 3.11, at the type's basic size."""
    import ctypes

    if sys.version_info[1] <= 10:
        return bytes(code.co_code)
    start = id(code) + type(code).__basicsize__
    return ctypes.string_at(start, len(code.co_code))


def raw(obj):
    import ctypes

    return ctypes.string_at(id(obj), sys.getsizeof(obj))


def pad8(data):
    return data + b"\0" * (-len(data) % 8)


def symbolize_seed(code):
    """A code object with its name, file name and line table after it, the
    pointers between them rewritten to fake-memory offsets."""
    minor = sys.version_info[1]
    table = line_table_of(code)
    parts = [pad8(raw(code))]
    targets = {}
    for obj in (code.co_name, code.co_filename, table):
        if id(obj) in targets:
            continue
        targets[id(obj)] = sum(len(p) for p in parts)
        parts.append(pad8(raw(obj)))
    targets[id(type(code))] = 0
    blob = bytearray(b"".join(parts))
    for at in range(0, len(parts[0]), 8):
        (word,) = struct.unpack_from("<Q", blob, at)
        if word in targets:
            struct.pack_into("<Q", blob, at, FAKE_POINTER_TAG | targets[word])
    units = len(code.co_code) // 2
    if minor <= 10:
        # f_lasti: bytes up to 3.9, code units in 3.10.
        scale = 2 if minor <= 9 else 1
        instrs = [0, scale * (units // 2), scale * (units - 1), 0xFFFFFFFF]
    else:
        start = type(code).__basicsize__
        instrs = [FAKE_POINTER_TAG | (start + 2 * i) for i in (0, units // 2, units - 1, units + 5)]
    frames = b"".join(struct.pack("<QQ", FAKE_POINTER_TAG, instr) for instr in instrs)
    return minor_selector(minor) + bytes([len(instrs) - 1]) + frames + bytes(blob)


def dump():
    minor = sys.version_info[1]
    out = {"minor": minor, "line_tables": [], "symbolize": [], "bytecode": []}
    for code in sample_code_objects():
        table = line_table_of(code)
        offset = len(code.co_code) // 2
        seed = struct.pack("<iQ", code.co_firstlineno, offset) + bytes(table)
        out["line_tables"].append(seed)
        out["symbolize"].append(symbolize_seed(code))
        out["bytecode"].append(minor_selector(minor) + adaptive_code(code))
    for key in ("line_tables", "symbolize", "bytecode"):
        out[key] = [base64.b64encode(seed).decode() for seed in out[key]]
    print(json.dumps(out))


# ------------------------------------------------------------ ELF cutting

SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOTE, SHT_DYNSYM = 2, 3, 4, 7, 11
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT = 6, 7

# Kept whole: what the symbol, relocation, PLT, note and dynamic-section
# readers parse.
WHOLE = {
    ".dynsym", ".dynstr", ".gnu.version", ".gnu.version_d", ".gnu.version_r",
    ".rela.plt", ".plt", ".plt.sec", ".plt.got", ".got.plt",
    ".dynamic", ".note.stapsdt", ".stapsdt.base",
}
# Code and data windows at these dynamic symbols: (name, bytes).
SYMBOL_WINDOWS = [
    ("Py_GetVersion", 128), ("Py_Version", 8), ("_PyRuntime", 648),
    ("PyTraceMalloc_Track", 16), ("PyTraceMalloc_Untrack", 16),
]
# The collector functions gc.rs probes, from .symtab.
COLLECTORS = [b"collect", b"gc_collect_main"]


class Elf:
    def __init__(self, data):
        self.data = data
        (self.shoff,) = struct.unpack_from("<Q", data, 0x28)
        self.shentsize, self.shnum, self.shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        self.sections = [
            list(struct.unpack_from("<IIQQQQIIQQ", data, self.shoff + i * 64))
            for i in range(self.shnum)
        ]
        names = self.section_bytes(self.sections[self.shstrndx])
        self.names = [names[s[0]:names.index(b"\0", s[0])].decode() for s in self.sections]

    def section_bytes(self, s):
        return self.data[s[4]:s[4] + s[5]] if s[1] != 8 else b""

    def symbols(self, kind):
        for i, s in enumerate(self.sections):
            if s[1] != kind:
                continue
            strings = self.section_bytes(self.sections[s[6]])
            table = self.section_bytes(s)
            for at in range(0, len(table) - 23, 24):
                name, info, other, shndx, value, size = struct.unpack_from("<IBBHQQ", table, at)
                yield strings[name:strings.index(b"\0", name)], info, other, shndx, value, size

    def section_at(self, vaddr):
        for i, s in enumerate(self.sections):
            if s[2] & SHF_ALLOC and s[1] != 8 and s[3] <= vaddr < s[3] + s[5]:
                return i
        return None

    def usdt_pcs(self):
        for i, s in enumerate(self.sections):
            if s[1] != SHT_NOTE:
                continue
            notes, at = self.section_bytes(s), 0
            while at + 12 <= len(notes):
                namesz, descsz, _ = struct.unpack_from("<III", notes, at)
                desc = at + 12 + (namesz + 3) // 4 * 4
                if desc + 8 <= len(notes):
                    yield struct.unpack_from("<Q", notes, desc)[0]
                at = desc + (descsz + 3) // 4 * 4


def cut_elf(data, version_text):
    """`data` with only what the analysis reads (see the module docstring)."""
    elf = Elf(data)
    windows = {}  # section index -> [(vaddr, len)]

    def window(vaddr, length):
        index = elf.section_at(vaddr)
        if index is not None and elf.names[index] not in WHOLE:
            windows.setdefault(index, []).append((vaddr, length))

    dynamic = {name: value for name, _, _, shndx, value, _ in elf.symbols(SHT_DYNSYM) if shndx}
    for name, length in SYMBOL_WINDOWS:
        if name.encode() in dynamic:
            window(dynamic[name.encode()], length)
    for pc in elf.usdt_pcs():
        window(pc, 16)
    collectors = [
        sym for sym in elf.symbols(SHT_SYMTAB) if sym[0] in COLLECTORS and sym[3] and sym[4]
    ]
    for sym in collectors:
        window(sym[4], 16)
    # The version strings Py_GetVersion's code points at.
    needle = version_text.encode() + b"\0"
    for i, s in enumerate(elf.sections):
        if s[2] & SHF_ALLOC and not s[2] & SHF_EXECINSTR and s[1] != 8:
            body = elf.section_bytes(s)
            for match in re.finditer(re.escape(needle), body):
                window(s[3] + match.start(), 16)

    out_sections = [[0] * 10]  # the null section
    out_names = [""]
    out_data = [b""]
    old_to_new = {0: 0}
    for i, s in enumerate(elf.sections):
        name = elf.names[i]
        if i == 0:
            continue
        if name in WHOLE:
            old_to_new[i] = len(out_sections)
            out_sections.append(list(s))
            out_names.append(name)
            out_data.append(elf.section_bytes(s))
        elif s[1] == SHT_RELA and s[2] & SHF_ALLOC:
            # .rela.dyn: only the GOT-slot relocations the PLT reader names.
            body = elf.section_bytes(s)
            kept = b"".join(
                body[at:at + 24]
                for at in range(0, len(body) - 23, 24)
                if struct.unpack_from("<Q", body, at + 8)[0] & 0xFFFFFFFF
                in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT)
            )
            old_to_new[i] = len(out_sections)
            out_sections.append(list(s))
            out_names.append(name)
            out_data.append(kept)
        elif i in windows:
            merged = []
            for start, length in sorted(windows[i]):
                end = min(start + length, s[3] + s[5])
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            for start, end in merged:
                copy = list(s)
                copy[3] = start
                copy[8] = 1
                old_to_new.setdefault(i, len(out_sections))
                out_sections.append(copy)
                out_names.append(name)
                out_data.append(data[s[4] + start - s[3]:s[4] + end - s[3]])
    # A .symtab of the collector functions alone, for gc.rs.
    if collectors:
        strtab = b"\0"
        symtab = b"\0" * 24
        for name, info, other, shndx, value, size in collectors:
            index = next(
                (j for j, c in enumerate(out_sections) if c[3] <= value < c[3] + len(out_data[j]) and j),
                0,
            )
            symtab += struct.pack("<IBBHQQ", len(strtab), info, other, index, value, size)
            strtab += name + b"\0"
        out_sections.append([0, SHT_SYMTAB, 0, 0, 0, 0, len(out_sections) + 1, 1, 8, 24])
        out_names.append(".symtab")
        out_data.append(symtab)
        out_sections.append([0, SHT_STRTAB, 0, 0, 0, 0, 0, 0, 1, 0])
        out_names.append(".strtab")
        out_data.append(strtab)
    for j, c in enumerate(out_sections):
        if j and c[1] != SHT_SYMTAB:
            c[6] = old_to_new.get(c[6], 0)
            if c[1] == SHT_RELA:
                c[7] = old_to_new.get(c[7], 0)
    shstrtab = b"\0"
    for j, name in enumerate(out_names):
        if j:
            out_sections[j][0] = len(shstrtab)
            shstrtab += name.encode() + b"\0"
    out_sections.append([len(shstrtab), SHT_STRTAB, 0, 0, 0, 0, 0, 0, 1, 0])
    shstrtab += b".shstrtab\0"
    out_data.append(shstrtab)

    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    header = bytearray(data[:64])
    body = bytearray(header) + data[phoff:phoff + phentsize * phnum]
    struct.pack_into("<Q", body, 0x20, 64)
    for j, c in enumerate(out_sections):
        if j == 0:
            continue
        body += b"\0" * (-len(body) % 8)
        c[4] = len(body)
        c[5] = len(out_data[j]) if c[1] != 8 else c[5]
        body += out_data[j] if c[1] != 8 else b""
    body += b"\0" * (-len(body) % 8)
    struct.pack_into("<Q", body, 0x28, len(body))
    struct.pack_into("<HHH", body, 0x3A, 64, len(out_sections), len(out_sections) - 1)
    for c in out_sections:
        body += struct.pack("<IIQQQQIIQQ", *c)
    return bytes(body)


# ----------------------------------------------------------------- driver


def interpreters():
    """(label, python command, ELF file analysed, version string)."""
    found = []
    for prefix in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*"))):
        version = os.path.basename(prefix)
        minor = int(version.split(".")[1])
        if minor < 8 or version.endswith("t"):
            continue
        python = os.path.join(prefix, "bin", "python3.%d" % minor)
        lib = os.path.join(prefix, "lib", "libpython3.%d.so.1.0" % minor)
        found.append(("pyenv-" + version, [python], lib, version))
    if os.path.exists("/usr/bin/python3.11"):
        version = subprocess.check_output(
            ["/usr/bin/python3.11", "-c", "import sys; print(sys.version.split()[0])"], text=True
        ).strip()
        found.append(("debian-3.11", ["/usr/bin/python3.11"], "/usr/bin/python3.11", version))
    for suite, python in (("trixie", "python3.13"), ("sid", "python3.14"), ("bullseye", "python3.9")):
        root = os.path.join(ROOT, ".cache", "rootfs", suite)
        binary = os.path.join(root, "usr", "bin", python)
        if os.path.exists(binary):
            command = ["chroot", root, "/usr/bin/" + python]
            version = subprocess.check_output(
                command + ["-c", "import sys; print(sys.version.split()[0])"], text=True
            ).strip()
            found.append((suite + "-" + python, command, binary, version))
    return found


def write(target, seed):
    directory = os.path.join(SEEDS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, hashlib.sha1(seed).hexdigest()), "wb") as f:
        f.write(seed)


def binary_image_seeds(elf_data):
    """`_Py_DebugOffsets` as the binary has it (3.13+), then a stub of
    `Py_GetVersion`: a RIP-relative lea and an absolute mov of the
    version string, which follows."""
    elf = Elf(elf_data)
    runtime = next(
        (value for name, _, _, shndx, value, _ in elf.symbols(SHT_DYNSYM) if name == b"_PyRuntime" and shndx),
        None,
    )
    index = elf.section_at(runtime) if runtime is not None else None
    if index is None:
        return []
    s = elf.sections[index]
    head = bytearray(elf.section_bytes(s)[runtime - s[3]:runtime - s[3] + 648])
    if head[:8] != b"xdebugpy":
        return []
    major, minor, micro = head[11], head[10], head[9]
    text = b"%d.%d.%d\0" % (major, minor, micro)
    stub_at = len(head)
    # lea rdi, [rip+0]: the string right after; mov ecx, imm32: its address.
    lea = b"\x48\x8d\x3d" + struct.pack("<i", 5)
    string_at = stub_at + len(lea) + 5
    mov = b"\xb9" + struct.pack("<I", 0x40_0000 + string_at)
    return [
        struct.pack("<H", stub_at) + bytes(head) + lea + mov + text,
        struct.pack("<H", stub_at) + bytes(head) + mov + lea + text,
    ]


def usdt_seeds(elf_data):
    elf = Elf(elf_data)
    base = next((s[3] for i, s in enumerate(elf.sections) if elf.names[i] == ".stapsdt.base"), 0)
    for s in elf.sections:
        if s[1] != SHT_NOTE:
            continue
        notes, at = elf.section_bytes(s), 0
        while at + 12 <= len(notes):
            namesz, descsz, kind = struct.unpack_from("<III", notes, at)
            name = notes[at + 12:at + 12 + namesz]
            desc = at + 12 + (namesz + 3) // 4 * 4
            if name == b"stapsdt\0" and kind == 3:
                yield struct.pack("<Q", base) + notes[desc:desc + descsz]
            at = desc + (descsz + 3) // 4 * 4


def main():
    import shutil

    for target in ("elf_file", "binary_image", "usdt_note", "line_tables", "symbolize", "bytecode"):
        shutil.rmtree(os.path.join(SEEDS, target), ignore_errors=True)
    launcher_done = False
    for label, command, binary, version in interpreters():
        with open(binary, "rb") as f:
            data = f.read()
        cut = cut_elf(data, version)
        write("elf_file", cut)
        for seed in binary_image_seeds(data):
            write("binary_image", seed)
        for seed in list(usdt_seeds(data))[:8]:
            write("usdt_note", seed)
        launcher = os.path.join(os.path.dirname(command[0]), os.path.basename(command[0]))
        if not launcher_done and label.startswith("pyenv-"):
            # An executable that links libpython: small enough to keep whole.
            with open(launcher, "rb") as f:
                write("elf_file", f.read())
            launcher_done = True
        script = os.path.abspath(__file__)
        if command[0] == "chroot":
            # The script is outside the chroot: pass it on stdin.
            with open(script) as f:
                dumped = subprocess.run(
                    command + ["-", "dump"], stdin=f, capture_output=True, text=True, check=True
                ).stdout
        else:
            dumped = subprocess.run(
                command + [script, "dump"], capture_output=True, text=True, check=True
            ).stdout
        records = json.loads(dumped)
        for target in ("line_tables", "symbolize", "bytecode"):
            for seed in records[target]:
                write(target, base64.b64decode(seed))
        print("%s (%s): ELF cut from %d to %d bytes" % (label, version, len(data), len(cut)))


if __name__ == "__main__":
    if sys.argv[1:] == ["dump"]:
        dump()
    else:
        main()
