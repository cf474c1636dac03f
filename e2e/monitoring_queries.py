#!/usr/bin/env python3
"""Runs every query of the Grafana dashboard and of the alert rules against a real
Prometheus (e2e scenario dashboard-and-alert-queries).

    monitoring_queries.py PROMETHEUS_URL DASHBOARD_JSON ALERT_NAME...

Dashboard queries get Grafana's variables replaced as Grafana would ($__rate_interval
by 1m, the template variables by .*; label_values(m, l) becomes count by (l) (m)). Each
query must succeed; the panels the issue asks for must also return data. The alert
rules (ALERT_NAME..., as the rules file names them) must all be loaded, evaluated
without error (health "ok"), and each expression must run as an instant query. Prints one line per query; exits 1 on any failure.
"""
import json
import re
import sys
import urllib.parse
import urllib.request

# Panels that must show data once messages were published and consumed.
REQUIRED_PANELS = [
    "Throughput: messages published and acknowledged",
    "Publish confirm latency",
    "Fsync latency",
    "Consumer lag per group",
    "Replication lag",
    "Raft leader changes",
    "Disk free",
]


def query(url, expr):
    data = urllib.parse.urlencode({"query": expr}).encode()
    try:
        with urllib.request.urlopen(url + "/api/v1/query", data=data, timeout=10) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        answer = json.load(e)
    if answer.get("status") != "success":
        return None, "%s: %s" % (answer.get("errorType"), answer.get("error"))
    return answer["data"]["result"], None


def grafana_to_promql(expr):
    expr = expr.replace("$__rate_interval", "1m")
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
    m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", expr.strip())
    if m:
        expr = "count by (%s) (%s)" % (m.group(2), m.group(1))
    return expr


def main():
    url, dashboard_path, alerts = sys.argv[1], sys.argv[2], sys.argv[3:]
    dashboard = json.load(open(dashboard_path))
    failures = []
    queries = 0
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        expr = grafana_to_promql(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
        queries += 1
        result, error = query(url, expr)
        if error:
            failures.append("variable %s: %s: %s" % (var["name"], expr, error))
        print("variable %-22s %-5s %s" % (var["name"], "ok" if not error else "ERROR", expr))
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        series = 0
        for target in panel.get("targets", []):
            expr = grafana_to_promql(target["expr"])
            queries += 1
            result, error = query(url, expr)
            if error:
                failures.append("panel %r: %s: %s" % (panel["title"], expr, error))
                continue
            series += len(result)
        print("panel %-52s %3d series" % (panel["title"][:52], series))
        if series == 0 and panel["title"] in REQUIRED_PANELS:
            failures.append("panel %r returned no data" % panel["title"])
    for title in REQUIRED_PANELS:
        if title not in titles:
            failures.append("the dashboard has no panel %r" % title)

    # The rules as Prometheus loaded and evaluated them from the rules file.
    with urllib.request.urlopen(url + "/api/v1/rules", timeout=10) as r:
        loaded = {
            rule["name"]: rule
            for group in json.load(r)["data"]["groups"]
            for rule in group["rules"]
        }
    if not alerts:
        failures.append("no alert names given")
    for name in alerts:
        rule = loaded.get(name)
        if rule is None:
            failures.append("rule %s is not loaded" % name)
            print("rule  %-40s missing" % name)
            continue
        queries += 1
        result, error = query(url, rule["query"])
        if error:
            failures.append("rule %s: %s" % (name, error))
        if rule.get("health") != "ok" or rule.get("lastError"):
            failures.append("rule %s as loaded: health %s %s" % (name, rule.get("health"), rule.get("lastError", "")))
        print("rule  %-40s health %-7s %d series now" % (name, rule.get("health"), len(result or [])))
    print("%d queries" % queries)
    for f in failures:
        print("FAILED: " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
