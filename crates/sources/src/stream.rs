//! Streaming a JSON file through a serde visitor, with early stops.

use std::cell::Cell;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use serde::de::DeserializeSeed;

use crate::SourceError;

/// Set by a visitor when its callback asked to stop; the parse error that follows (the rest
/// of the file left unread) is then no error.
#[derive(Default)]
pub(crate) struct StopFlag(Cell<bool>);

impl StopFlag {
    pub(crate) fn stop<E: serde::de::Error>(&self) -> E {
        self.0.set(true);
        E::custom("reading stopped by the caller")
    }

    pub(crate) fn stopped(&self) -> bool {
        self.0.get()
    }
}

/// Runs `seed` over the JSON in `path`. A parse failure becomes [`SourceError::Format`] with
/// `expected` and serde's message (with its line and column), unless `stop` was set.
pub(crate) fn stream_json<'de, S>(
    path: &Path,
    expected: &'static str,
    stop: &StopFlag,
    seed: S,
) -> Result<(), SourceError>
where
    S: DeserializeSeed<'de, Value = ()>,
{
    let file = File::open(path).map_err(|e| SourceError::io(path, e))?;
    // A large buffer: GQA's scene graphs are a gigabyte.
    let reader = BufReader::with_capacity(1 << 20, file);
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = seed.deserialize(&mut de).and_then(|()| de.end());
    match result {
        Ok(()) => Ok(()),
        Err(_) if stop.stopped() => Ok(()),
        Err(e) if e.is_io() => Err(SourceError::io(path, std::io::Error::other(e.to_string()))),
        Err(e) => Err(SourceError::format(path, expected, e.to_string())),
    }
}

/// Reads a whole (small) JSON file into `T`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &'static str,
) -> Result<T, SourceError> {
    let file = File::open(path).map_err(|e| SourceError::io(path, e))?;
    serde_json::from_reader(BufReader::new(file))
        .map_err(|e| SourceError::format(path, expected, e.to_string()))
}

/// A JSON value that may be written as a string or a number (image ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct IdString(pub String);

impl<'de> serde::Deserialize<'de> for IdString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IdString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an id (a string or an integer)")
            }
            fn visit_str<E>(self, v: &str) -> Result<IdString, E> {
                Ok(IdString(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<IdString, E> {
                Ok(IdString(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<IdString, E> {
                Ok(IdString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object read into its entries in file order (serde_json's maps sort their keys).
pub(crate) struct Ordered<T>(pub Vec<(String, T)>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered<T>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}
