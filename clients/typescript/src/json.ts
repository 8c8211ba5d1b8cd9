/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | JsonObject;
/** A JSON object. */
export type JsonObject = { [key: string]: Json };

/**
 * `value` as plain JSON, with the semantics of `JSON.stringify`: `toJSON()`
 * is honoured (a `Date` becomes its ISO string), `undefined`, functions and
 * symbols are left out of objects and become `null` in arrays, and
 * non-finite numbers become `null`. A `bigint` becomes a number when it is
 * one exactly (a `TypeError` otherwise), as does a cycle.
 *
 * Every `google.protobuf.Value` this package sends goes through here, so
 * none is ever sent unset (Streamer refuses an unset Value).
 */
export function toJson(value: unknown): Json {
  const json = normalize(value, "", false, new Set());
  return json === undefined ? null : json;
}

/** `value` as a JSON object (see `toJson`); `undefined` stays `undefined`. */
export function toJsonObject(value: unknown, what = "metadata"): JsonObject | undefined {
  if (value === undefined) {
    return undefined;
  }
  const json = toJson(value);
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    throw new TypeError(`${what} must be a JSON object`);
  }
  return json;
}

function normalize(value: unknown, key: string, inArray: boolean, seen: Set<object>): Json | undefined {
  if (value !== null && typeof value === "object" && typeof (value as { toJSON?: unknown }).toJSON === "function") {
    value = (value as { toJSON(key: string): unknown }).toJSON(key);
  }
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      return Number.isFinite(value) ? value : null;
    case "bigint":
      if (BigInt(Number(value)) !== value) {
        throw new TypeError(`${value} cannot be sent as a JSON number exactly`);
      }
      return Number(value);
    case "undefined":
    case "function":
    case "symbol":
      return inArray ? null : undefined;
  }
  if (value === null) {
    return null;
  }
  const object = value as object;
  if (seen.has(object)) {
    throw new TypeError("a cyclic value cannot be sent as JSON");
  }
  seen.add(object);
  try {
    if (Array.isArray(object)) {
      return object.map((item, index) => normalize(item, String(index), true, seen) as Json);
    }
    if (object instanceof Number || object instanceof String || object instanceof Boolean) {
      return normalize(object.valueOf(), key, inArray, seen);
    }
    const out: JsonObject = {};
    for (const [name, item] of Object.entries(object)) {
      const json = normalize(item, name, false, seen);
      if (json !== undefined) {
        out[name] = json;
      }
    }
    return out;
  } finally {
    seen.delete(object);
  }
}
