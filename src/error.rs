//! Error text for people: an error and its sources, in order, by their `Display` only.

/// `e` followed by each of its sources (skipping a source whose text the previous ones already
/// contain). The AWS SDK's and kube's top-level messages ("dispatch failure", "client error")
/// say little on their own; their `Debug` form, which the SDK's `DisplayErrorContext` appends,
/// is a struct dump no user should have to read.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner: refused")]
    struct Inner;

    #[test]
    fn sources_follow_in_order() {
        assert_eq!(super::chain(&Outer(Inner)), "outer: inner: refused");
    }
}
