//! Allocation sites as a flame graph (SVG, rendered by `inferno`): widths
//! are live bytes, each site contributes its heaviest stack, root at the
//! bottom, frames labelled `function (file:line)`.
use anyhow::{Result, bail};
use inferno::flamegraph::{self, Options, Palette, color::BasicPalette};

use crate::{cpython::Frame, sites::Site};

/// Renders the SVG; an error when no site holds live bytes (an empty
/// graph would only say "no input").
pub fn render_svg(sites: &[Site], title: &str) -> Result<Vec<u8>> {
    let folded = folded_stacks(sites);
    if folded.is_empty() {
        bail!("no live bytes are attributed to any allocation site yet");
    }
    let mut options = Options::default();
    options.title = title.to_string();
    options.count_name = "bytes".to_string();
    options.colors = Palette::Basic(BasicPalette::Mem);
    // Same sites, same SVG: colours from names, not randomness.
    options.hash = true;
    options.deterministic = true;
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded.iter().map(String::as_str), &mut svg)?;
    Ok(svg)
}

/// Brendan Gregg's folded format, one line per site with live bytes:
/// `root;...;leaf bytes`.
fn folded_stacks(sites: &[Site]) -> Vec<String> {
    sites
        .iter()
        .filter(|site| site.bytes > 0)
        .map(|site| {
            let frames: Vec<String> = site.frames().iter().rev().map(label).collect();
            format!("{} {}", frames.join(";"), site.bytes)
        })
        .collect()
}

/// `function (file:line)`; `;` separates frames in the folded format.
fn label(frame: &Frame) -> String {
    let Frame {
        function,
        file,
        line,
    } = frame;
    format!("{function} ({file}:{line})").replace(';', ",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(stack: Vec<Frame>, bytes: u64) -> Site {
        Site::of_stack(stack, bytes, bytes)
    }

    #[test]
    fn folded_stacks_are_root_first_and_skip_sites_without_live_bytes() {
        let sites = [
            site(
                vec![Frame::in_app("leak", 9), Frame::in_app("main", 30)],
                800,
            ),
            site(
                vec![Frame::in_app("churn", 5), Frame::in_app("main", 31)],
                0,
            ),
        ];
        assert_eq!(
            folded_stacks(&sites),
            ["main (app.py:30);leak (app.py:9) 800"]
        );
    }

    #[test]
    fn svg_names_the_frames() {
        let sites = [site(
            vec![Frame::in_app("leak", 9), Frame::in_app("main", 30)],
            800,
        )];
        let svg = String::from_utf8(render_svg(&sites, "t").unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("leak (app.py:9)"));
    }

    #[test]
    fn nothing_live_is_an_error() {
        let sites = [site(vec![Frame::in_app("churn", 5)], 0)];
        assert!(render_svg(&sites, "t").is_err());
    }
}
