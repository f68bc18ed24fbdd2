//! The one way the project names a wanted spatial layout: "subject relation object".

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Relation;

/// "subject relation object", e.g. (dog, right of, teddy bear): the subject is the object that
/// is placed, the object the reference it is placed against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Triplet {
    /// Lower case, words separated by single spaces ("dog").
    pub subject: String,
    pub relation: Relation,
    /// The reference object ("teddy bear").
    pub object: String,
}

impl Triplet {
    pub fn new(subject: impl Into<String>, relation: Relation, object: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            relation,
            object: object.into(),
        }
    }
}

impl fmt::Display for Triplet {
    /// The override syntax of the command line: "dog,right of,teddy bear".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{}",
            self.subject,
            self.relation.name(),
            self.object
        )
    }
}
