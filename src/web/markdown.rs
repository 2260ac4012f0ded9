//! Message text to HTML, for the owner's eyes: pulldown-cmark with every
//! raw HTML event shown as text, links only to http, https and mailto
//! (opened without a referrer), and images shown as links, never loaded
//! (a remote image would tell its sender when the message was read).

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

fn options() -> Options {
    // No heading attributes (`{#id .class}`): a stranger's text must not
    // set ids or classes on this page. No footnotes (they add ids too).
    Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_SMART_PUNCTUATION
}

/// Escapes text for an HTML attribute value or element content.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A link target that may be followed from the UI: absolute http, https or mailto.
fn safe_url(dest: &str) -> Option<String> {
    let url = url::Url::parse(dest.trim()).ok()?;
    matches!(url.scheme(), "http" | "https" | "mailto").then(|| url.to_string())
}

/// Renders CommonMark `md` to safe HTML.
pub fn render(md: &str) -> String {
    // Per open link or image: whether it became an `<a>`.
    let mut open: Vec<bool> = Vec::new();
    let events = Parser::new_ext(md, options()).map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        Event::Start(Tag::HtmlBlock) => Event::Html("<pre class=\"raw\">".into()),
        Event::End(TagEnd::HtmlBlock) => Event::Html("</pre>\n".into()),
        Event::Start(Tag::Link {
            dest_url, title, ..
        }) => match safe_url(&dest_url) {
            Some(url) => {
                open.push(true);
                let title = if title.is_empty() {
                    String::new()
                } else {
                    format!(" title=\"{}\"", escape(&title))
                };
                Event::InlineHtml(
                    format!(
                        "<a href=\"{}\"{title} rel=\"nofollow noopener noreferrer\">",
                        escape(&url)
                    )
                    .into(),
                )
            }
            None => {
                open.push(false);
                Event::InlineHtml("<span class=\"link\">".into())
            }
        },
        Event::Start(Tag::Image { dest_url, .. }) => match safe_url(&dest_url) {
            Some(url) => {
                open.push(true);
                Event::InlineHtml(
                    format!(
                        "<a class=\"image\" href=\"{}\" rel=\"nofollow noopener noreferrer\">[image: ",
                        escape(&url)
                    )
                    .into(),
                )
            }
            None => {
                open.push(false);
                Event::InlineHtml("<span class=\"image\">[image: ".into())
            }
        },
        Event::End(TagEnd::Link) => {
            let a = open.pop().unwrap_or(false);
            Event::InlineHtml(if a { "</a>" } else { "</span>" }.into())
        }
        Event::End(TagEnd::Image) => {
            let a = open.pop().unwrap_or(false);
            Event::InlineHtml(if a { "]</a>" } else { "]</span>" }.into())
        }
        other => other,
    });
    let mut html = String::with_capacity(md.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

/// The first `max` characters of the message's text, without markup, on one line.
pub fn plain_text(md: &str, max: usize) -> String {
    let mut out = String::new();
    for event in Parser::new_ext(md, options()) {
        match event {
            Event::Text(t) | Event::Code(t) | Event::Html(t) | Event::InlineHtml(t) => {
                out.push_str(&t)
            }
            Event::SoftBreak | Event::HardBreak => out.push(' '),
            // Blocks end with a space; inline markup ("Hi **Bob**,") does not.
            Event::End(
                TagEnd::Emphasis
                | TagEnd::Strong
                | TagEnd::Strikethrough
                | TagEnd::Link
                | TagEnd::Image
                | TagEnd::Superscript
                | TagEnd::Subscript,
            ) => {}
            Event::End(_) => out.push(' '),
            _ => {}
        }
        if out.chars().count() > max * 2 {
            break;
        }
    }
    let words: Vec<&str> = out.split_whitespace().collect();
    let line = words.join(" ");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max).collect();
        format!("{}…", cut.trim_end())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_html_is_text() {
        let html = render(
            "hi <script>alert(1)</script> <img src=x onerror=alert(1)>\n\n<div onclick=x>\n*block*\n</div>\n",
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<div"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("&lt;div onclick=x&gt;"), "{html}");
    }

    #[test]
    fn only_safe_links_and_no_images_load() {
        let html = render(
            "[a](https://ok.example/x?a=1&b=\"2\") [b](javascript:alert(1)) [c](/ui/signout) \
             ![pic](https://tracker.example/p.gif) <https://auto.example/>",
        );
        assert!(
            html.contains(r#"<a href="https://ok.example/x?a=1&amp;b=%222%22" rel="nofollow noopener noreferrer">a</a>"#),
            "{html}"
        );
        assert!(!html.contains("javascript:"), "{html}");
        assert!(!html.contains("href=\"/ui"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("[image: pic]"), "{html}");
        assert!(html.contains("href=\"https://auto.example/\""), "{html}");
    }

    #[test]
    fn headings_take_no_attributes() {
        let html = render("# Hi {#nav .top}\n");
        assert!(!html.contains("id="), "{html}");
        assert!(!html.contains("class="), "{html}");
    }

    #[test]
    fn plain_text_is_short_and_flat() {
        assert_eq!(plain_text("# Hi\n\nthere *you*", 100), "Hi there you");
        assert_eq!(
            plain_text("Hi **Bob**, [x](https://a/).", 100),
            "Hi Bob, x."
        );
        assert_eq!(plain_text("abcdef", 3), "abc…");
        assert_eq!(plain_text("ééééé", 2), "éé…");
    }
}
