// indiepm: advertises this site's PM endpoint with <link rel="pm">.
//
// In eleventy.config.js (Eleventy 2 or 3):
//
//     const pmLink = require("./pm-link.js");          // CommonJS config
//     // or: import pmLink from "./pm-link.js";         // ESM config
//     module.exports = (eleventyConfig) => {
//       eleventyConfig.addPlugin(pmLink, { endpoint: "https://pm.example.org/pm" });
//     };
//
// Then write {% pmLink %} (Nunjucks, Liquid) or ${this.pmLink()} (11ty.js)
// inside <head>. The endpoint defaults to the PM_ENDPOINT environment
// variable; with neither, nothing is emitted. With { transform: true } the
// link is added before </head> of every HTML page that lacks one, for
// layouts you would rather not edit.

function escapeAttr(value) {
  return String(value)
    .replace(/&/g, "&amp;")
    .replace(/"/g, "&quot;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;");
}

function pmLinkTag(endpoint) {
  return endpoint ? `<link rel="pm" href="${escapeAttr(endpoint)}">` : "";
}

module.exports = function pmLink(eleventyConfig, options = {}) {
  const endpoint = options.endpoint || process.env.PM_ENDPOINT || "";
  const tag = pmLinkTag(endpoint);
  eleventyConfig.addShortcode("pmLink", (url) => pmLinkTag(url || endpoint));
  if (options.transform && tag) {
    eleventyConfig.addTransform("pm-link", function (content) {
      const out = this.page && this.page.outputPath;
      if (typeof out !== "string" || !out.endsWith(".html")) return content;
      if (/<link\b[^>]*\brel=["']?pm["'\s>]/i.test(content)) return content;
      const at = content.search(/<\/head\s*>/i);
      return at < 0 ? content : content.slice(0, at) + tag + content.slice(at);
    });
  }
};

module.exports.pmLinkTag = pmLinkTag;
