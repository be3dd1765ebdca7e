//! Which binding owns a policy document when several manage the same policy. Pure.

/// One binding's claim on a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentClaim {
    /// `namespace/name` of the binding.
    pub key: String,
    /// Creation time (seconds since the epoch); earlier claims win.
    pub created: i64,
    /// Canonical JSON of the document.
    pub document: String,
}

/// The earliest claim among `others` whose document differs from `mine` and that came first
/// (older, or as old with a smaller key). `None` means `mine` may manage the document.
pub fn earlier_conflict<'a>(
    mine: &DocumentClaim,
    others: &'a [DocumentClaim],
) -> Option<&'a DocumentClaim> {
    others
        .iter()
        .filter(|o| o.key != mine.key && o.document != mine.document)
        .filter(|o| (o.created, &o.key) < (mine.created, &mine.key))
        .min_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(key: &str, created: i64, doc: &str) -> DocumentClaim {
        DocumentClaim {
            key: key.into(),
            created,
            document: doc.into(),
        }
    }

    #[test]
    fn the_later_binding_conflicts() {
        let a = claim("ns/a", 10, "{1}");
        let b = claim("ns/b", 20, "{2}");
        assert_eq!(earlier_conflict(&b, std::slice::from_ref(&a)), Some(&a));
        assert_eq!(earlier_conflict(&a, std::slice::from_ref(&b)), None);
    }

    #[test]
    fn same_document_is_no_conflict() {
        let a = claim("ns/a", 10, "{1}");
        let b = claim("ns/b", 20, "{1}");
        assert_eq!(earlier_conflict(&b, &[a]), None);
    }

    #[test]
    fn ties_break_on_key() {
        let a = claim("ns/a", 10, "{1}");
        let b = claim("ns/b", 10, "{2}");
        assert_eq!(earlier_conflict(&b, std::slice::from_ref(&a)), Some(&a));
        assert_eq!(earlier_conflict(&a, &[b]), None);
    }
}
