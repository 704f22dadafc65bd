// Veil's API page: reads openapi.json and lists every operation with its parameters,
// request and response schemas. DOM calls only (textContent, never innerHTML): no text of
// the document can become markup. No dependencies, nothing fetched but openapi.json.
"use strict";

(function () {
  const METHODS = ["get", "post", "put", "patch", "delete"];
  const MAX_DEPTH = 4;
  let doc = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function refName(ref) {
    return ref.split("/").pop();
  }

  function resolve(node) {
    // A $ref into components (schemas, responses, headers, parameters), else the node.
    let seen = 0;
    while (node && typeof node.$ref === "string" && seen++ < 10) {
      const parts = node.$ref.replace(/^#\//, "").split("/");
      let target = doc;
      for (const part of parts) target = target ? target[part] : undefined;
      if (!target) return node;
      node = target;
    }
    return node;
  }

  const CONSTRAINTS = [
    ["minimum", "≥ "], ["maximum", "≤ "], ["exclusiveMinimum", "> "], ["exclusiveMaximum", "< "],
    ["minLength", "min length "], ["maxLength", "max length "], ["pattern", "pattern "],
    ["minItems", "min items "], ["maxItems", "max items "], ["maxProperties", "max properties "],
    ["format", "format "], ["contentMediaType", "content "],
  ];

  function typeLabel(schema) {
    if (!schema || typeof schema !== "object") return "any";
    if (schema.$ref) return refName(schema.$ref);
    if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
    if ("const" in schema) return JSON.stringify(schema.const);
    const alts = schema.anyOf || schema.oneOf;
    if (alts) return alts.map(typeLabel).join(" | ");
    if (schema.type === "array") return "array of " + typeLabel(schema.items);
    if (Array.isArray(schema.type)) return schema.type.join(" | ");
    return schema.type || "any";
  }

  function notes(schema) {
    const out = [];
    for (const [key, label] of CONSTRAINTS) {
      if (schema && key in schema) out.push(label + String(schema[key]));
    }
    if (schema && "default" in schema) out.push("default " + JSON.stringify(schema.default));
    if (schema && Array.isArray(schema.examples) && schema.examples.length) {
      out.push("e.g. " + schema.examples.map((v) => JSON.stringify(v)).join(", "));
    }
    return out;
  }

  // A schema as a nested list: its type, constraints, description, and its properties,
  // items and alternatives, expanding references a few levels deep (then a link).
  function renderSchema(schema, depth, seen) {
    const box = el("div", { class: "schema" });
    if (!schema || typeof schema !== "object") {
      box.append(el("code", {}, "any"));
      return box;
    }
    const line = el("div", { class: "schema-type" }, el("code", {}, typeLabel(schema)));
    if (schema.$ref) {
      const name = refName(schema.$ref);
      line.append(" ", el("a", { href: "#schema-" + name }, "↗"));
      box.append(line);
      if (depth < MAX_DEPTH && !seen.has(name)) {
        box.append(renderSchema(resolve(schema), depth + 1, new Set([...seen, name])));
      }
      return box;
    }
    const alts = schema.anyOf || schema.oneOf;
    // What an alternative says of itself (a nullable field's bounds and description are
    // on its non-null side) shows on the field's own line.
    const sides = [schema, ...(alts || []).filter((a) => !a.$ref && !a.properties && !a.contentSchema)];
    const extra = sides.flatMap(notes);
    if (extra.length) line.append(el("span", { class: "notes" }, " " + extra.join(", ")));
    box.append(line);
    for (const side of sides) {
      if (side.description) box.append(el("p", { class: "desc" }, side.description));
    }
    // Alternatives with a structure of their own are expanded; the plain ones are on the line.
    const rich = (a) => a.$ref || a.properties || a.contentSchema ||
      (a.items && (a.items.$ref || a.items.properties || a.items.anyOf));
    if (alts && alts.some(rich)) {
      const list = el("ul", { class: "alts" });
      for (const alt of alts.filter(rich)) list.append(el("li", {}, renderSchema(alt, depth + 1, seen)));
      box.append(list);
    }
    if (schema.properties) {
      const required = new Set(schema.required || []);
      const table = el("table", { class: "props" });
      for (const [name, prop] of Object.entries(schema.properties)) {
        table.append(el("tr", {},
          el("td", {}, el("code", {}, name), required.has(name) ? el("span", { class: "req" }, " required") : null),
          el("td", {}, renderSchema(prop, depth + 1, seen))));
      }
      box.append(table);
    } else if (schema.additionalProperties && typeof schema.additionalProperties === "object") {
      box.append(el("div", { class: "desc" }, "values: "), renderSchema(schema.additionalProperties, depth + 1, seen));
    }
    if (schema.type === "array" && schema.items && (schema.items.$ref || schema.items.properties)) {
      box.append(renderSchema(schema.items, depth + 1, seen));
    }
    if (schema.contentSchema) box.append(renderSchema(schema.contentSchema, depth + 1, seen));
    return box;
  }

  function renderParameters(params) {
    const table = el("table", { class: "params" },
      el("tr", {}, el("th", {}, "name"), el("th", {}, "in"), el("th", {}, "schema"), el("th", {}, "description")));
    for (const raw of params) {
      const p = resolve(raw);
      table.append(el("tr", {},
        el("td", {}, el("code", {}, p.name), p.required ? el("span", { class: "req" }, " required") : null),
        el("td", {}, p.in),
        el("td", {}, renderSchema(p.schema, 1, new Set())),
        el("td", {}, p.description || "")));
    }
    return table;
  }

  function renderContent(content) {
    const box = el("div", { class: "content" });
    for (const [media, entry] of Object.entries(content || {})) {
      box.append(el("div", { class: "media" }, el("code", {}, media)));
      if (entry.schema) {
        box.append(renderSchema(entry.schema, 1, new Set()));
      }
      for (const [name, example] of Object.entries(entry.examples || {})) {
        box.append(el("div", { class: "example-name" }, "example: " + name),
          el("pre", { class: "example" }, JSON.stringify(example.value, null, 2)));
      }
    }
    return box;
  }

  function renderResponses(responses) {
    const list = el("div", { class: "responses" });
    for (const [status, raw] of Object.entries(responses)) {
      const r = resolve(raw);
      const head = el("div", { class: "status status-" + status[0] + "xx" },
        el("strong", {}, status), " ", r.description || "");
      const item = el("details", { class: "response" }, el("summary", {}, head));
      const headers = Object.entries(r.headers || {});
      if (headers.length) {
        const table = el("table", { class: "headers" });
        for (const [name, h] of headers) {
          const header = resolve(h);
          table.append(el("tr", {}, el("td", {}, el("code", {}, name)),
            el("td", {}, el("code", {}, typeLabel(header.schema))), el("td", {}, header.description || "")));
        }
        item.append(el("div", { class: "label" }, "headers"), table);
      }
      if (r.content) item.append(renderContent(r.content));
      list.append(item);
    }
    return list;
  }

  function renderOperation(path, method, op) {
    const id = "op-" + (op.operationId || method + path);
    const section = el("section", { class: "operation", id: id, "data-search": [method, path, op.summary || "", (op.tags || []).join(" ")].join(" ").toLowerCase() },
      el("h3", {}, el("span", { class: "method method-" + method }, method.toUpperCase()), " ",
        el("code", { class: "path" }, path), " ", el("span", { class: "summary" }, op.summary || "")));
    const security = op.security !== undefined ? op.security : doc.security || [];
    section.append(el("p", { class: "auth" }, security.length ? "Authorization: Bearer key" : "No key needed"));
    if (op.description) section.append(el("p", { class: "desc" }, op.description));
    if (op.parameters && op.parameters.length) {
      section.append(el("h4", {}, "Parameters"), renderParameters(op.parameters));
    }
    if (op.requestBody) {
      section.append(el("h4", {}, "Request body"), renderContent(resolve(op.requestBody).content));
    }
    section.append(el("h4", {}, "Responses"), renderResponses(op.responses || {}));
    return section;
  }

  function render() {
    const info = doc.info || {};
    document.title = (info.title || "API") + " " + (info.version || "");
    document.getElementById("title").textContent = (info.title || "API") + " " + (info.version || "");
    document.getElementById("summary").textContent = info.description || info.summary || "";
    const main = document.getElementById("operations");
    const toc = document.getElementById("toc");
    main.replaceChildren();
    const byTag = new Map();
    let count = 0;
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        if (!item[method]) continue;
        const tag = (item[method].tags || ["other"])[0];
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push([path, method, item[method]]);
        count++;
      }
    }
    const order = (doc.tags || []).map((t) => t.name);
    const rank = (tag) => (order.includes(tag) ? order.indexOf(tag) : order.length);
    const groups = [...byTag].sort((a, b) => rank(a[0]) - rank(b[0]));
    const tocList = el("ul", {});
    for (const [tag, ops] of groups) {
      main.append(el("h2", { id: "tag-" + tag }, tag));
      const sub = el("ul", {});
      for (const [path, method, op] of ops) {
        const section = renderOperation(path, method, op);
        main.append(section);
        sub.append(el("li", {}, el("a", { href: "#" + section.id }, method.toUpperCase() + " " + path)));
      }
      tocList.append(el("li", {}, el("a", { href: "#tag-" + tag }, tag), sub));
    }
    toc.replaceChildren(tocList);
    const schemas = document.getElementById("schemas");
    schemas.replaceChildren(el("h2", {}, "Schemas"));
    for (const [name, schema] of Object.entries((doc.components || {}).schemas || {})) {
      schemas.append(el("section", { class: "component", id: "schema-" + name },
        el("h3", {}, name), renderSchema(schema, 1, new Set([name]))));
    }
    main.prepend(el("p", { id: "status", role: "status" }, count + " operations"));
    document.body.dataset.rendered = String(count);
  }

  function filter(text) {
    const words = text.toLowerCase().split(/\s+/).filter(Boolean);
    for (const section of document.querySelectorAll(".operation")) {
      const hay = section.getAttribute("data-search") || "";
      section.hidden = !words.every((w) => hay.includes(w));
    }
  }

  async function main() {
    const status = document.getElementById("status");
    try {
      const response = await fetch("openapi.json", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      doc = await response.json();
      render();
      document.getElementById("filter").addEventListener("input", (e) => filter(e.target.value));
    } catch (error) {
      status.textContent = "Could not load openapi.json: " + error.message;
      document.body.dataset.rendered = "error";
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
