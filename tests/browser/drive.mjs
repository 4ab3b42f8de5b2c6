// Drives Debian's Chromium (headless, through playwright-core; no browser is downloaded)
// to the page of tests/test_browser_synapse.py and reports what happened there, as one JSON object
// on standard output:
//
//   MSC3391_BROWSER_JOB=JOB node drive.mjs
//
// JOB (in the environment, not argv: it carries an access token) is a JSON object:
//   {"pageUrl": "http://127.0.0.1:P/index.html", "sdk": "37" | "43",
//    "baseUrl": "http://127.0.0.1:Q", "userId", "accessToken", "deviceId",
//    "type", "content", "stepTimeoutMs", "runTimeoutMs", "chromium": "/usr/bin/chromium"}
//
// The output has the page's `results` (tests/browser/page/scenario.js), the browser's
// console messages and page errors, and the network as Chromium saw it (including CORS
// preflights, which only the DevTools protocol shows). Exit status: 0 when every step of
// the page succeeded, 1 otherwise (the JSON is printed either way), 2 for a bad job.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

let job;
try {
    job = JSON.parse(process.env.MSC3391_BROWSER_JOB ?? "");
} catch (e) {
    console.error(`MSC3391_BROWSER_JOB is not a JSON job: ${e}`);
    process.exit(2);
}
const runTimeoutMs = job.runTimeoutMs ?? 90000;
const homeserverOrigin = new URL(job.baseUrl).origin;

// This machine's network is closed: everything Chromium would fetch on its own (updates,
// QUIC probes, sync, first-run pages) is turned off, so nothing waits on a connection.
const args = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

const output = {
    console: [],
    pageErrors: [],
    // Requests to the homeserver's origin: Chromium's view, one entry per request id.
    network: [],
    results: null,
};
const byId = new Map();
const sentOrigins = new Map();

function networkEntry(id) {
    let entry = byId.get(id);
    if (entry === undefined) {
        entry = { id };
        byId.set(id, entry);
        output.network.push(entry);
    }
    return entry;
}

const lowerCased = (headers) =>
    Object.fromEntries(Object.entries(headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));

// A fresh profile for every run: nothing cached (no preflight cache) from an earlier one.
const userDataDir = mkdtempSync(join(tmpdir(), "msc3391-chromium-"));
let context;
let failed = true;
try {
    context = await chromium.launchPersistentContext(userDataDir, {
        executablePath: job.chromium ?? "/usr/bin/chromium",
        headless: true,
        args,
        timeout: 30000,
    });
    const page = context.pages()[0] ?? (await context.newPage());
    page.on("console", (message) =>
        output.console.push({ type: message.type(), text: message.text(), url: message.location().url || null }),
    );
    page.on("pageerror", (error) => output.pageErrors.push(String(error?.stack ?? error)));

    // The DevTools protocol reports CORS preflights (type "Preflight") and CORS refusals
    // (corsErrorStatus), which playwright's own request events leave out.
    const cdp = await context.newCDPSession(page);
    cdp.on("Network.requestWillBeSent", ({ requestId, request, type }) => {
        if (!request.url.startsWith(homeserverOrigin)) return;
        const entry = networkEntry(requestId);
        Object.assign(entry, { type, method: request.method, path: new URL(request.url).pathname });
        // Bodies of account data writes: which PUT was the `{}` of a delete.
        if (request.postData !== undefined) entry.body = request.postData;
        entry.origin ??= lowerCased(request.headers).origin ?? null;
    });
    // The headers as sent: `Origin` is added below the page, so only these carry it. They
    // may come before the request itself, so they are joined to it at the end.
    cdp.on("Network.requestWillBeSentExtraInfo", ({ requestId, headers }) => {
        const origin = lowerCased(headers).origin;
        if (origin !== undefined) sentOrigins.set(requestId, origin);
    });
    cdp.on("Network.responseReceived", ({ requestId, response }) => {
        if (!byId.has(requestId)) return;
        const headers = lowerCased(response.headers);
        Object.assign(byId.get(requestId), {
            status: response.status,
            allowOrigin: headers["access-control-allow-origin"] ?? null,
            allowMethods: headers["access-control-allow-methods"] ?? null,
        });
    });
    cdp.on("Network.loadingFailed", ({ requestId, errorText, corsErrorStatus }) => {
        if (!byId.has(requestId)) return;
        Object.assign(byId.get(requestId), { failed: errorText, corsError: corsErrorStatus ?? null });
    });
    await cdp.send("Network.enable");

    const url = new URL(job.pageUrl);
    url.searchParams.set("sdk", job.sdk);
    await page.goto(url.href, { timeout: 30000 });
    await page.waitForFunction(() => window.msc3391Ready === true || window.loadError !== undefined, null, {
        timeout: 30000,
    });
    const loadError = await page.evaluate(() => window.loadError ?? null);
    if (loadError !== null) throw new Error(`the page did not load its bundle: ${loadError}`);

    const { accessToken, baseUrl, content, deviceId, stepTimeoutMs, type, userId } = job;
    // Started, not awaited: the page reports through window.results, read below even when
    // the run does not finish in time.
    await page.evaluate((pageJob) => {
        window.msc3391.run(pageJob);
    }, { accessToken, baseUrl, content, deviceId, stepTimeoutMs: stepTimeoutMs ?? 20000, type, userId });
    try {
        await page.waitForFunction(() => window.results?.done === true, null, { timeout: runTimeoutMs });
    } catch (e) {
        output.driverError = `the page did not finish within ${runTimeoutMs} ms: ${e.message}`;
    }
    output.results = await page.evaluate(() => window.results ?? null);
    failed =
        output.driverError !== undefined ||
        output.results === null ||
        output.results.unexpected !== undefined ||
        !output.results.steps.every((s) => s.ok);
} catch (e) {
    output.driverError = String(e?.stack ?? e);
} finally {
    await context?.close().catch(() => {});
    for (const entry of output.network) entry.origin = sentOrigins.get(entry.id) ?? entry.origin ?? null;
    rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(output) + "\n");
process.exit(failed ? 1 : 0);
