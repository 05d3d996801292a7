//! Splitting the kernel command line into `key[=value]` words.
//!
//! The kernel allows double quotes around a value (`foo="a b"`) or a whole
//! word; a naive `split_whitespace` would cut such a value in two and, for a
//! module parameter, hand the module garbage. This follows the kernel's own
//! `next_arg()` rules (lib/cmdline.c): quotes group, and are then dropped.

/// One word of the command line: `key` alone, or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub key: String,
    pub value: Option<String>,
}

/// Splits a command line into its words, honouring double quotes.
pub fn parse(cmdline: &str) -> Vec<Param> {
    let mut params = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                in_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if in_word {
                    params.push(split_word(&word));
                    word.clear();
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        params.push(split_word(&word));
    }
    params
}

fn split_word(word: &str) -> Param {
    match word.split_once('=') {
        Some((key, value)) => Param {
            key: key.to_owned(),
            value: Some(value.to_owned()),
        },
        None => Param {
            key: word.to_owned(),
            value: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: &str, value: Option<&str>) -> Param {
        Param {
            key: key.into(),
            value: value.map(Into::into),
        }
    }

    #[test]
    fn splits_words_and_values() {
        assert_eq!(
            parse("console=ttyS0  quiet clh.port=1025\n"),
            vec![
                p("console", Some("ttyS0")),
                p("quiet", None),
                p("clh.port", Some("1025"))
            ]
        );
    }

    #[test]
    fn quotes_group_and_are_dropped() {
        assert_eq!(
            parse(r#"a="b c" "d=e f" g="#),
            vec![p("a", Some("b c")), p("d", Some("e f")), p("g", Some(""))]
        );
    }

    #[test]
    fn value_may_contain_equals_and_colons() {
        assert_eq!(
            parse("virtio_mmio.device=512@0xfeb00e00:12"),
            vec![p("virtio_mmio.device", Some("512@0xfeb00e00:12"))]
        );
    }
}
