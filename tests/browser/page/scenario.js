// The browser side of tests/test_browser_synapse.py: matrix-js-sdk (37.5.0 or 43.0.0, whichever
// build.mjs aliased "matrix-js-sdk" to) sets, reads, deletes and reads again one account
// data type against a homeserver on another origin, with the SDK's own public calls.
//
// `window.msc3391.run(job)` starts the run; `window.results` fills in step by step and has
// `done: true` at the end, so a run that hangs still shows how far it got. A step that fails
// ends the run: what follows it would only report the same failure again.
//
// job: {baseUrl, userId, accessToken, deviceId, type, content, stepTimeoutMs}

import { ClientEvent, MatrixError, Method, SyncState, createClient } from "matrix-js-sdk";

/* global SDK_VERSION */ // replaced by build.mjs with the bundled SDK's package.json version

const status = document.getElementById("status");

class StepFailed extends Error {}

function withTimeout(promise, ms, what) {
    let timer;
    const expired = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    });
    return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

/** What the test needs to know about an error; `isMatrixError` is the SDK's own class. */
function describe(e) {
    return {
        isMatrixError: e instanceof MatrixError,
        name: e?.name ?? null,
        message: String(e?.message ?? e),
        errcode: e?.errcode ?? null,
        httpStatus: e?.httpStatus ?? null,
        data: e?.data ?? null,
    };
}

// JSON has no `undefined`: it is reported as the string "undefined", so that "the call
// returned nothing" stays distinguishable from "the call returned null".
const reported = (value) => (value === undefined ? "undefined" : value);

function nextAccountData(client, type, predicate) {
    return new Promise((resolve) => {
        const listener = (event) => {
            if (event.getType() !== type || !predicate(event.getContent())) return;
            client.off(ClientEvent.AccountData, listener);
            resolve(event.getContent());
        };
        client.on(ClientEvent.AccountData, listener);
    });
}

function prepared(client) {
    return new Promise((resolve, reject) => {
        client.on(ClientEvent.Sync, (state, _previous, data) => {
            if (state === SyncState.Prepared) resolve();
            if (state === SyncState.Error) reject(new Error(`sync error: ${data?.error?.message ?? data?.error}`));
        });
    });
}

async function run(job) {
    const results = {
        sdkVersion: SDK_VERSION,
        pageOrigin: location.origin,
        homeserverOrigin: new URL(job.baseUrl).origin,
        steps: [],
        // Every request the SDK made, as it handed it to the browser's fetch.
        requests: [],
        done: false,
    };
    window.results = results;

    const makeClient = (name) =>
        createClient({
            baseUrl: job.baseUrl,
            userId: job.userId,
            deviceId: job.deviceId,
            accessToken: job.accessToken,
            fetchFn: async (resource, options) => {
                const url = new URL(resource instanceof Request ? resource.url : String(resource));
                const entry = { client: name, method: options?.method ?? "GET", path: url.pathname };
                results.requests.push(entry);
                try {
                    const response = await fetch(resource, options);
                    entry.status = response.status;
                    return response;
                } catch (e) {
                    // A CORS refusal reaches page code only as this TypeError.
                    entry.error = `${e.name}: ${e.message}`;
                    throw e;
                }
            },
        });

    // `client` runs the sync loop, which setAccountData (both versions) and 43.0.0's
    // deleteAccountData wait on for their echo, and from which 37.5.0 learns (/versions)
    // that the server supports MSC3391. `reader` is never started: once a client's initial
    // sync is complete, getAccountDataFromServer answers from its store instead of asking
    // the server, and these reads must go over the network.
    const client = makeClient("client");
    const reader = makeClient("reader");
    const path = `/user/${encodeURIComponent(job.userId)}/account_data/${encodeURIComponent(job.type)}`;

    async function step(name, body) {
        const entry = { name, ok: false };
        results.steps.push(entry);
        status.textContent = `running: ${name}`;
        try {
            entry.value = reported(await withTimeout(body(), job.stepTimeoutMs, name));
            entry.ok = true;
        } catch (e) {
            entry.error = describe(e);
            throw new StepFailed(name);
        }
    }

    try {
        await step("start", async () => {
            const ready = prepared(client);
            await client.startClient({ initialSyncLimit: 1 });
            await ready;
            return { supportsMsc3391: await client.doesServerSupportUnstableFeature("org.matrix.msc3391") };
        });
        await step("set", () => client.setAccountData(job.type, job.content));
        await step("read", () => reader.getAccountDataFromServer(job.type));

        let deletionSynced;
        await step("delete", () => {
            // Listening before the call: the echo may arrive while the DELETE is answered.
            deletionSynced = nextAccountData(client, job.type, (content) => Object.keys(content).length === 0);
            return client.deleteAccountData(job.type);
        });
        await step("deletion synced", async () => {
            const content = await deletionSynced;
            return { content, inStore: reported(client.getAccountData(job.type)?.getContent()) };
        });
        await step("read after delete", () => reader.getAccountDataFromServer(job.type));
        // getAccountDataFromServer turns M_NOT_FOUND into null; the same GET at the level
        // below it shows the MatrixError the browser code receives.
        await step("read after delete, raw", async () => {
            try {
                return { returned: reported(await reader.http.authedRequest(Method.Get, path)) };
            } catch (e) {
                if (e instanceof MatrixError) return { thrown: describe(e) };
                throw e;
            }
        });
    } catch (e) {
        if (!(e instanceof StepFailed)) results.unexpected = describe(e);
    } finally {
        client.stopClient();
        reader.stopClient();
        results.done = true;
        status.textContent = JSON.stringify(results, null, 2);
    }
}

window.msc3391 = { run };
window.msc3391Ready = true;
status.textContent = `ready: matrix-js-sdk ${SDK_VERSION}`;
