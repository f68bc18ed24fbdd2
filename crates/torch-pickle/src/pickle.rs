//! A pickle reader that builds values and never runs code.
//!
//! Python's unpickler imports whatever module a `GLOBAL` names and calls it on `REDUCE`; that is
//! how a checkpoint can run arbitrary code. Here a `GLOBAL` is checked against a short allow-list
//! the moment it is read (the tensor and storage rebuilders, `OrderedDict`, `set`, `frozenset`,
//! `torch.Size`, and `_codecs.encode` for protocol-2 bytes), and each allowed name is "called" by
//! Rust code that only builds a value. Anything else is refused with its module and name.
//!
//! candle's own `candle_core::pickle` also interprets pickles without running code, but it accepts
//! every global (an unknown callable just becomes an opaque node), copies memoised containers
//! (so a container filled after it was memoised reads back empty), and allocates from declared
//! lengths; this reader refuses unknown globals, shares memoised containers as Python does, and
//! bounds every allocation by the bytes actually present.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::error::ErrorKind;
use crate::value::{StorageRef, StorageType, TensorRef, Value};
use crate::Limits;

/// The globals a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    RebuildTensorV2,
    RebuildParameter,
    OrderedDict,
    Set,
    FrozenSet,
    TorchSize,
    CodecsEncode,
    Storage(StorageType),
}

fn allowed(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("collections", "OrderedDict") => Global::OrderedDict,
        // Protocol 2 writes Python 3's `builtins` under its Python 2 name.
        ("builtins" | "__builtin__", "set") => Global::Set,
        ("builtins" | "__builtin__", "frozenset") => Global::FrozenSet,
        ("torch", "Size") => Global::TorchSize,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch", class) => Global::Storage(StorageType::from_class(class)?),
        _ => return None,
    })
}

/// A dict key: Python requires keys to be hashable, so only scalars and tuples of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    None,
    Bool(bool),
    Int(i64),
    Float(u64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Vec<Key>),
}

#[derive(Debug, Default)]
struct DictObj {
    items: Vec<(Obj, Obj)>,
    index: HashMap<Key, usize>,
}

/// Objects on the machine's stack. Mutable containers are shared, as in Python, so that a
/// container memoised before it is filled reads back filled.
#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Obj]>),
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(Rc<RefCell<DictObj>>),
    Set(Rc<RefCell<Vec<Obj>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Set(_) => "set",
            Obj::Global(_) => "class",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }

    fn new_dict() -> Self {
        Obj::Dict(Rc::new(RefCell::new(DictObj::default())))
    }
}

fn key_of(obj: &Obj) -> Option<Key> {
    Some(match obj {
        Obj::None => Key::None,
        Obj::Bool(b) => Key::Bool(*b),
        Obj::Int(i) => Key::Int(*i),
        Obj::Float(f) => Key::Float(f.to_bits()),
        Obj::Str(s) => Key::Str(s.clone()),
        Obj::Bytes(b) => Key::Bytes(b.clone()),
        Obj::Tuple(t) => Key::Tuple(t.iter().map(key_of).collect::<Option<_>>()?),
        _ => return None,
    })
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current opcode starts, for messages.
    at: usize,
    stack: Vec<Obj>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Obj>,
}

type R<T> = Result<T, ErrorKind>;

impl<'a> Machine<'a> {
    fn fail<T>(&self, message: impl Into<String>) -> R<T> {
        Err(ErrorKind::Pickle {
            offset: self.at,
            message: message.into(),
        })
    }

    fn take(&mut self, n: u64) -> R<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.fail(format!(
                "the pickle ends early: {n} bytes announced, {left} left"
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> R<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("length checked"))
    }

    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("a text argument is not terminated by a newline");
        };
        self.pos += n + 1;
        match std::str::from_utf8(&rest[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.fail("a text argument is not UTF-8"),
        }
    }

    fn utf8(&mut self, n: u64) -> R<Obj> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Obj::Str(s.into())),
            Err(_) => self.fail("a string is not valid UTF-8"),
        }
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, obj: Obj) {
        self.stack.push(obj);
    }

    fn pop(&mut self) -> R<Obj> {
        if self.stack.len() <= self.floor() {
            return self.fail("the stack is empty where an object was expected");
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&self) -> R<&Obj> {
        if self.stack.len() <= self.floor() {
            return self.fail("the stack is empty where an object was expected");
        }
        Ok(self.stack.last().expect("checked non-empty"))
    }

    fn pop_mark(&mut self) -> R<Vec<Obj>> {
        let Some(m) = self.marks.pop() else {
            return self.fail("no MARK to pop to");
        };
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, id: u64) -> R<Obj> {
        match self.memo.get(&id) {
            Some(o) => Ok(o.clone()),
            None => self.fail(format!("memo entry {id} was never stored")),
        }
    }

    fn memo_put(&mut self, id: u64) -> R<()> {
        let obj = self.top()?.clone();
        self.memo.insert(id, obj);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> R<Obj> {
        match allowed(module, name) {
            Some(g) => Ok(Obj::Global(g)),
            None => Err(ErrorKind::ForbiddenGlobal {
                offset: self.at,
                module: module.to_string(),
                name: name.to_string(),
            }),
        }
    }

    fn dict_insert(&self, dict: &Obj, key: Obj, value: Obj) -> R<()> {
        let Obj::Dict(d) = dict else {
            return self.fail(format!(
                "items are set on a {} (expected a dict)",
                dict.kind()
            ));
        };
        let Some(k) = key_of(&key) else {
            return self.fail(format!("a {} is used as a dict key", key.kind()));
        };
        let mut d = d.borrow_mut();
        match d.index.get(&k) {
            Some(&i) => d.items[i].1 = value,
            None => {
                let i = d.items.len();
                d.index.insert(k, i);
                d.items.push((key, value));
            }
        }
        Ok(())
    }

    fn persistent_load(&self, pid: Obj) -> R<Obj> {
        let expected = "expected ('storage', torch.<Type>Storage, key, location, numel)";
        let Obj::Tuple(t) = &pid else {
            return self.fail(format!("a persistent id is a {}; {expected}", pid.kind()));
        };
        match &t[..] {
            [Obj::Str(tag), Obj::Global(Global::Storage(dtype)), Obj::Str(key), Obj::Str(location), Obj::Int(numel)]
                if &**tag == "storage" && *numel >= 0 =>
            {
                Ok(Obj::Storage(Rc::new(StorageRef {
                    key: key.to_string(),
                    dtype: *dtype,
                    numel: *numel as usize,
                    location: location.to_string(),
                })))
            }
            _ => self.fail(format!("unexpected persistent id; {expected}")),
        }
    }

    fn sizes(&self, obj: &Obj, what: &str) -> R<Vec<usize>> {
        let items: Vec<Obj> = match obj {
            Obj::Tuple(t) => t.to_vec(),
            Obj::List(l) => l.borrow().clone(),
            _ => return self.fail(format!("{what} is a {} (expected a tuple)", obj.kind())),
        };
        items
            .iter()
            .map(|o| match o {
                Obj::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => self.fail(format!(
                    "{what} holds a {} (expected non-negative ints)",
                    o.kind()
                )),
            })
            .collect()
    }

    fn empty_hooks(&self, obj: &Obj) -> R<()> {
        match obj {
            Obj::Dict(d) if d.borrow().items.is_empty() => Ok(()),
            Obj::None => Ok(()),
            _ => self.fail("a tensor has backward hooks (expected none)"),
        }
    }

    /// Applies an allowed global to its arguments.
    fn call(&self, callable: Obj, args: Obj) -> R<Obj> {
        let Obj::Global(g) = callable else {
            return self.fail(format!(
                "a {} is called (only allowed globals can be)",
                callable.kind()
            ));
        };
        let Obj::Tuple(args) = args else {
            return self.fail(format!(
                "call arguments are a {} (expected a tuple)",
                args.kind()
            ));
        };
        let items = |o: &Obj| -> R<Vec<Obj>> {
            match o {
                Obj::Tuple(t) => Ok(t.to_vec()),
                Obj::List(l) | Obj::Set(l) => Ok(l.borrow().clone()),
                _ => self.fail(format!("expected a sequence, found a {}", o.kind())),
            }
        };
        match g {
            Global::OrderedDict => {
                let dict = Obj::new_dict();
                match &args[..] {
                    [] => {}
                    [pairs] => {
                        for pair in items(pairs)? {
                            match &items(&pair)?[..] {
                                [k, v] => self.dict_insert(&dict, k.clone(), v.clone())?,
                                _ => return self.fail("OrderedDict items are not pairs"),
                            }
                        }
                    }
                    _ => return self.fail("OrderedDict takes at most one argument"),
                }
                Ok(dict)
            }
            Global::Set | Global::FrozenSet => {
                let content = match &args[..] {
                    [] => Vec::new(),
                    [it] => items(it)?,
                    _ => return self.fail("set takes at most one argument"),
                };
                Ok(Obj::Set(Rc::new(RefCell::new(content))))
            }
            Global::TorchSize => match &args[..] {
                [dims] => {
                    let dims = self.sizes(dims, "torch.Size")?;
                    Ok(Obj::Tuple(dims.into_iter().map(|d| Obj::Int(d as i64)).collect()))
                }
                _ => self.fail("torch.Size takes one tuple"),
            },
            Global::CodecsEncode => match &args[..] {
                [Obj::Str(s), Obj::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                    let mut out = Vec::with_capacity(s.len());
                    for c in s.chars() {
                        match u8::try_from(u32::from(c)) {
                            Ok(b) => out.push(b),
                            Err(_) => return self.fail("latin1 bytes hold a character above 255"),
                        }
                    }
                    Ok(Obj::Bytes(out.into()))
                }
                _ => self.fail("_codecs.encode is only accepted as encode(str, 'latin1') (how protocol 2 writes bytes)"),
            },
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&args.len()) {
                    return self.fail(format!(
                        "_rebuild_tensor_v2 takes 6 or 7 arguments, found {}",
                        args.len()
                    ));
                }
                let Obj::Storage(storage) = &args[0] else {
                    return self.fail(format!(
                        "_rebuild_tensor_v2's storage is a {}",
                        args[0].kind()
                    ));
                };
                let offset = match args[1] {
                    Obj::Int(o) if o >= 0 => o as usize,
                    _ => return self.fail("_rebuild_tensor_v2's offset is not a non-negative int"),
                };
                let shape = self.sizes(&args[2], "the tensor size")?;
                let stride = self.sizes(&args[3], "the tensor stride")?;
                if shape.len() != stride.len() {
                    return self.fail(format!(
                        "a tensor has {} sizes but {} strides",
                        shape.len(),
                        stride.len()
                    ));
                }
                let requires_grad = match args[4] {
                    Obj::Bool(b) => b,
                    _ => return self.fail("_rebuild_tensor_v2's requires_grad is not a bool"),
                };
                self.empty_hooks(&args[5])?;
                if let Some(meta) = args.get(6) {
                    // Metadata would carry flags (conjugate, negative) that change the values.
                    match meta {
                        Obj::None => {}
                        Obj::Dict(d) if d.borrow().items.is_empty() => {}
                        _ => return self.fail("a tensor carries metadata (expected none)"),
                    }
                }
                Ok(Obj::Tensor(Rc::new(TensorRef {
                    storage: (**storage).clone(),
                    offset,
                    shape,
                    stride,
                    requires_grad,
                })))
            }
            Global::RebuildParameter => match &args[..] {
                [Obj::Tensor(t), Obj::Bool(rg), hooks] => {
                    self.empty_hooks(hooks)?;
                    let mut t = (**t).clone();
                    t.requires_grad = *rg;
                    Ok(Obj::Tensor(Rc::new(t)))
                }
                _ => self.fail("_rebuild_parameter takes (tensor, requires_grad, hooks)"),
            },
            Global::Storage(t) => self.fail(format!(
                "torch.{}Storage is called (storages come only from persistent ids)",
                t.torch_name()
            )),
        }
    }

    fn unsupported<T>(&self, opcode: u8, what: &'static str) -> R<T> {
        Err(ErrorKind::UnsupportedOpcode {
            offset: self.at,
            opcode,
            what,
        })
    }

    fn run(&mut self) -> R<Obj> {
        loop {
            self.at = self.pos;
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.fail(format!("pickle protocol {v} (expected 0 to 5)"));
                    }
                }
                op::FRAME => {
                    self.le::<8>()?;
                }
                op::STOP => {
                    let top = self.pop()?;
                    return Ok(top);
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return self.fail("POP on an empty stack");
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let top = self.top()?.clone();
                    self.push(top);
                }
                op::NONE => self.push(Obj::None),
                op::NEWTRUE => self.push(Obj::Bool(true)),
                op::NEWFALSE => self.push(Obj::Bool(false)),
                op::BININT => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64))
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64))
                }
                op::LONG1 | op::LONG4 => {
                    let n = if code == op::LONG1 {
                        self.u8()? as u64
                    } else {
                        u32::from_le_bytes(self.le()?) as u64
                    };
                    if n > 8 {
                        return self
                            .fail(format!("an integer of {n} bytes (at most 8 are supported)"));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = [0u8; 8];
                    buf[..bytes.len()].copy_from_slice(bytes);
                    // Two's complement, little-endian: sign-extend from the last byte.
                    if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
                        buf[bytes.len()..].fill(0xff);
                    }
                    self.push(Obj::Int(i64::from_le_bytes(buf)))
                }
                op::INT | op::LONG => {
                    let line = self.line()?;
                    let obj = match line {
                        "00" if code == op::INT => Obj::Bool(false),
                        "01" if code == op::INT => Obj::Bool(true),
                        _ => match line.trim_end_matches('L').parse::<i64>() {
                            Ok(v) => Obj::Int(v),
                            Err(_) => {
                                return self.fail(format!("{line:?} is not a 64-bit integer"))
                            }
                        },
                    };
                    self.push(obj)
                }
                op::FLOAT => {
                    let line = self.line()?;
                    match line.parse::<f64>() {
                        Ok(v) => self.push(Obj::Float(v)),
                        Err(_) => return self.fail(format!("{line:?} is not a float")),
                    }
                }
                op::BINFLOAT => {
                    // Pickle floats are big-endian, unlike its ints.
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Obj::Float(v))
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let s = self.utf8(n)?;
                    self.push(s)
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as u64;
                    let s = self.utf8(n)?;
                    self.push(s)
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.le()?);
                    let s = self.utf8(n)?;
                    self.push(s)
                }
                op::BINSTRING | op::SHORT_BINSTRING => {
                    // Python 2 str; Python 3 decodes it as ASCII by default.
                    let n = if code == op::BINSTRING {
                        u32::from_le_bytes(self.le()?) as u64
                    } else {
                        self.u8()? as u64
                    };
                    let bytes = self.take(n)?;
                    if !bytes.is_ascii() {
                        return self.fail("a Python 2 string is not ASCII");
                    }
                    let s = std::str::from_utf8(bytes).expect("ASCII is UTF-8");
                    self.push(Obj::Str(s.into()))
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = match code {
                        op::SHORT_BINBYTES => self.u8()? as u64,
                        op::BINBYTES => u32::from_le_bytes(self.le()?) as u64,
                        _ => u64::from_le_bytes(self.le()?),
                    };
                    let bytes = self.take(n)?;
                    self.push(Obj::Bytes(bytes.into()))
                }
                op::EMPTY_TUPLE => self.push(Obj::Tuple(Rc::new([]))),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items.into()))
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items.into()))
                }
                op::EMPTY_LIST => self.push(Obj::List(Rc::new(RefCell::new(Vec::new())))),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(Rc::new(RefCell::new(items))))
                }
                op::APPEND | op::APPENDS => {
                    let items = if code == op::APPEND {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().extend(items),
                        other => {
                            return self.fail(format!(
                                "items are appended to a {} (expected a list)",
                                other.kind()
                            ))
                        }
                    }
                }
                op::EMPTY_DICT => self.push(Obj::new_dict()),
                op::DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.fail("DICT with an odd number of items");
                    }
                    let dict = Obj::new_dict();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        self.dict_insert(&dict, k, v)?;
                    }
                    self.push(dict)
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?.clone();
                    self.dict_insert(&dict, key, value)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.fail("SETITEMS with an odd number of items");
                    }
                    let dict = self.top()?.clone();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        self.dict_insert(&dict, k, v)?;
                    }
                }
                op::EMPTY_SET => self.push(Obj::Set(Rc::new(RefCell::new(Vec::new())))),
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Obj::Set(s) => s.borrow_mut().extend(items),
                        other => {
                            return self.fail(format!(
                                "items are added to a {} (expected a set)",
                                other.kind()
                            ))
                        }
                    }
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Set(Rc::new(RefCell::new(items))))
                }
                op::BINGET => {
                    let id = self.u8()? as u64;
                    let o = self.memo_get(id)?;
                    self.push(o)
                }
                op::LONG_BINGET => {
                    let id = u32::from_le_bytes(self.le()?) as u64;
                    let o = self.memo_get(id)?;
                    self.push(o)
                }
                op::GET => {
                    let line = self.line()?;
                    let Ok(id) = line.parse::<u64>() else {
                        return self.fail(format!("memo index {line:?} is not a number"));
                    };
                    let o = self.memo_get(id)?;
                    self.push(o)
                }
                op::BINPUT => {
                    let id = self.u8()? as u64;
                    self.memo_put(id)?
                }
                op::LONG_BINPUT => {
                    let id = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_put(id)?
                }
                op::PUT => {
                    let line = self.line()?;
                    let Ok(id) = line.parse::<u64>() else {
                        return self.fail(format!("memo index {line:?} is not a number"));
                    };
                    self.memo_put(id)?
                }
                op::MEMOIZE => {
                    let id = self.memo.len() as u64;
                    self.memo_put(id)?
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(g)
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (&module, &name) else {
                        return self.fail("STACK_GLOBAL names are not strings");
                    };
                    let g = self.global(module, name)?;
                    self.push(g)
                }
                op::INST => {
                    // Names a class to instantiate; nothing a checkpoint needs.
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    return Err(ErrorKind::ForbiddenGlobal {
                        offset: self.at,
                        module,
                        name,
                    });
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(storage)
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let out = self.call(callable, args)?;
                    self.push(out)
                }
                op::BUILD => {
                    let state = self.pop()?;
                    match (self.top()?, &state) {
                        // An OrderedDict's instance attributes (a state dict's `_metadata`
                        // versions); they are not items, and nothing here needs them.
                        (Obj::Dict(_), Obj::Dict(_) | Obj::None | Obj::Tuple(_)) => {}
                        (target, _) => {
                            return self.fail(format!(
                            "BUILD sets the state of a {} (only a dict's attributes are accepted)",
                            target.kind()
                        ))
                        }
                    }
                }
                op::PERSID => return self.unsupported(code, "text persistent id"),
                op::STRING => return self.unsupported(code, "text string"),
                op::UNICODE => return self.unsupported(code, "text unicode string"),
                op::OBJ => return self.unsupported(code, "OBJ: build a class instance"),
                op::NEWOBJ_EX => {
                    return self.unsupported(code, "NEWOBJ_EX: build a class instance")
                }
                op::EXT1 | op::EXT2 | op::EXT4 => {
                    return self.unsupported(code, "extension registry")
                }
                op::NEXT_BUFFER | op::READONLY_BUFFER => {
                    return self.unsupported(code, "out-of-band buffer")
                }
                _ => return self.unsupported(code, "unknown opcode"),
            }
        }
    }
}

/// Turns the machine's objects into a [`Value`] tree, bounding depth (cycles) and the number of
/// nodes (shared memo references can otherwise expand exponentially).
struct Convert {
    nodes: usize,
    limits: Limits,
}

impl Convert {
    fn value(&mut self, obj: &Obj, depth: usize) -> R<Value> {
        if depth > self.limits.max_depth {
            return Err(ErrorKind::Limit {
                what: "nesting depth of the pickled value (a cycle?)",
                limit: self.limits.max_depth as u64,
                actual: depth as u64,
            });
        }
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(ErrorKind::Limit {
                what: "number of values in the pickle",
                limit: self.limits.max_nodes as u64,
                actual: self.nodes as u64,
            });
        }
        let seq = |me: &mut Self, items: &[Obj]| -> R<Vec<Value>> {
            items.iter().map(|o| me.value(o, depth + 1)).collect()
        };
        Ok(match obj {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(i) => Value::Int(*i),
            Obj::Float(f) => Value::Float(*f),
            Obj::Str(s) => Value::Str(s.to_string()),
            Obj::Bytes(b) => Value::Bytes(b.to_vec()),
            Obj::Tuple(t) => Value::Tuple(seq(self, t)?),
            Obj::List(l) => Value::List(seq(self, &l.borrow())?),
            Obj::Set(s) => Value::Set(seq(self, &s.borrow())?),
            Obj::Dict(d) => {
                let d = d.borrow();
                let mut out = Vec::with_capacity(d.items.len());
                for (k, v) in &d.items {
                    out.push((self.value(k, depth + 1)?, self.value(v, depth + 1)?));
                }
                Value::Dict(out)
            }
            Obj::Tensor(t) => Value::Tensor((**t).clone()),
            Obj::Global(_) | Obj::Storage(_) => {
                return Err(ErrorKind::Pickle {
                    offset: 0,
                    message: format!(
                        "the pickled value holds a bare {} (expected only data and tensors)",
                        obj.kind()
                    ),
                })
            }
        })
    }
}

/// Reads one pickle stream into a value, refusing any global outside the allow-list.
pub fn parse(data: &[u8], limits: &Limits) -> Result<Value, ErrorKind> {
    if data.len() as u64 > limits.max_pickle_bytes {
        return Err(ErrorKind::Limit {
            what: "size of the pickle",
            limit: limits.max_pickle_bytes,
            actual: data.len() as u64,
        });
    }
    let mut m = Machine {
        data,
        pos: 0,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let top = m.run()?;
    Convert {
        nodes: 0,
        limits: limits.clone(),
    }
    .value(&top, 0)
}
