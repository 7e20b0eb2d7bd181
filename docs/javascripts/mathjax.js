// MathJax 3 for pymdownx.arithmatex (generic mode), as the mkdocs-material
// documentation configures it: only the spans and divs that arithmatex emits
// (class "arithmatex", delimiters \( \) and \[ \]) are typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Typeset again after each page change of instant navigation.
document$.subscribe(() => {
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
