// The work-order panel of the console: the steps as a stepper (sandbox → plan → implement →
// commit → push → pull request), the agent's output tailing live, the commit, branch and pull
// request, turns and cost per step. It reads the public work-order routes only.
"use strict";
(function () {
  const Stagecraft = (window.Stagecraft = window.Stagecraft || {});
  const panels = (Stagecraft._panels = Stagecraft._panels || []);
  panels.push({
    matches: (run) => run.kind === "work_order",
    render(run, ui) {
      const { h, money, badge } = ui;
      const id = encodeURIComponent(run.run_id);
      const stepper = h("ol", { class: "stepper", id: "work-order-steps" });
      const facts = h("dl", { class: "facts", id: "work-order-facts" });
      const tail = h("pre", { class: "text tail", id: "work-order-log" });
      let finished = false;
      async function refresh() {
        try {
          const [order, history] = await Promise.all([
            ui.api("/agent-work-orders/" + id),
            ui.api("/agent-work-orders/" + id + "/steps"),
          ]);
          finished = ["completed", "failed", "cancelled"].includes(order.status);
          ui.put(stepper, ...history.steps.map((step) => h("li", { class: "step s-" + step.status, dataset: { step: step.step } },
            h("div", { class: "step-name" }, step.step.replace("_", " ")),
            badge(step.status),
            h("div", { class: "muted small" },
              step.turns !== null && step.turns !== undefined ? `${step.turns} turn${step.turns === 1 ? "" : "s"} · ` : "",
              money(step.cost_usd)),
            step.error ? h("div", { class: "bad small" }, step.error.code) : null)));
          const pr = order.pull_request || {};
          const link = (url) => (typeof url !== "string" ? "—" : /^https?:\/\//.test(url) ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, url) : url);
          ui.put(facts,
            h("dt", {}, "Repository"), h("dd", {}, order.repository_url),
            h("dt", {}, "Branch"), h("dd", { class: "mono" }, order.branch_name || "—"),
            h("dt", {}, "Commit"), h("dd", { class: "mono", id: "work-order-commit" }, order.commit || "—"),
            h("dt", {}, "Pull request"), h("dd", { id: "work-order-pr" }, link(pr.url || pr.html_url)),
            h("dt", {}, "Request"), h("dd", {}, order.user_request));
        } catch (e) { ui.put(facts, h("dd", { class: "bad" }, e.message)); }
      }
      function follow() {
        const source = new EventSource("/agent-work-orders/" + id + "/logs");
        ui.stream(source);
        source.addEventListener("entry", (message) => {
          let entry;
          try { entry = JSON.parse(message.data); } catch (_) { return; }
          tail.append(`[${entry.step}] ${entry.kind}: ${entry.text}\n`);
          if (tail.childNodes.length > 2000) tail.firstChild.remove();
          tail.scrollTop = tail.scrollHeight;
        });
        source.onerror = () => source.close();
      }
      refresh();
      follow();
      ui.every(3000, () => { if (!finished) refresh(); });
      return h("section", { class: "panel" }, h("h2", {}, "Work order"), stepper, facts,
        h("h3", {}, "Agent output"), tail);
    },
  });
})();
