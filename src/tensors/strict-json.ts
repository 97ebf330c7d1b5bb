/**
 * A strict JSON parser for untrusted headers.
 *
 * Differences from `JSON.parse`, each on purpose:
 * - a duplicate key in any object is an error (JSON.parse silently keeps the last one);
 * - integer literals become `bigint`, so a value beyond 2^53 is seen exactly instead of rounded;
 * - objects are `Map`s, so keys such as `__proto__` are plain data;
 * - lone surrogates in `\u` escapes and nesting deeper than `maxDepth` are errors.
 */
export type Json = null | boolean | string | number | bigint | Json[] | JsonObject;
export type JsonObject = Map<string, Json>;

export class JsonSyntaxError extends Error {
  constructor(
    message: string,
    readonly position: number,
  ) {
    super(`${message} at character ${position}`);
    this.name = "JsonSyntaxError";
  }
}

const INTEGER = /^-?(?:0|[1-9][0-9]*)$/;
const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;

export function parseStrictJson(text: string, maxDepth = 64): Json {
  let pos = 0;

  const fail = (message: string): never => {
    throw new JsonSyntaxError(message, pos);
  };
  const skipWhitespace = () => {
    for (;;) {
      const c = text.charCodeAt(pos);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) pos++;
      else return;
    }
  };
  const expectLiteral = (literal: string, value: Json): Json => {
    if (!text.startsWith(literal, pos)) fail("unexpected token");
    pos += literal.length;
    return value;
  };

  const parseString = (): string => {
    pos++; // opening quote
    let out = "";
    let runStart = pos;
    for (;;) {
      const c = text.charCodeAt(pos);
      if (Number.isNaN(c)) fail("unterminated string");
      if (c === 0x22) {
        out += text.slice(runStart, pos);
        pos++;
        return out;
      }
      if (c < 0x20) fail("control character in string");
      if (c !== 0x5c) {
        pos++;
        continue;
      }
      out += text.slice(runStart, pos);
      const e = text[pos + 1];
      pos += 2;
      switch (e) {
        case '"':
          out += '"';
          break;
        case "\\":
          out += "\\";
          break;
        case "/":
          out += "/";
          break;
        case "b":
          out += "\b";
          break;
        case "f":
          out += "\f";
          break;
        case "n":
          out += "\n";
          break;
        case "r":
          out += "\r";
          break;
        case "t":
          out += "\t";
          break;
        case "u": {
          const unit = readHex4();
          if (unit >= 0xd800 && unit <= 0xdbff) {
            if (text[pos] !== "\\" || text[pos + 1] !== "u") fail("lone surrogate in \\u escape");
            pos += 2;
            const low = readHex4();
            if (low < 0xdc00 || low > 0xdfff) fail("lone surrogate in \\u escape");
            out += String.fromCharCode(unit, low);
          } else if (unit >= 0xdc00 && unit <= 0xdfff) {
            fail("lone surrogate in \\u escape");
          } else {
            out += String.fromCharCode(unit);
          }
          break;
        }
        default:
          pos -= 1;
          fail("invalid escape");
      }
      runStart = pos;
    }
  };

  const readHex4 = (): number => {
    const hex = text.slice(pos, pos + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail("invalid \\u escape");
    pos += 4;
    return Number.parseInt(hex, 16);
  };

  const parseNumber = (): number | bigint => {
    NUMBER.lastIndex = pos;
    const match = NUMBER.exec(text);
    if (!match) return fail("invalid number");
    const literal = match[0];
    pos += literal.length;
    if (INTEGER.test(literal)) return BigInt(literal);
    const value = Number(literal);
    if (!Number.isFinite(value)) fail("number out of range");
    return value;
  };

  const parseValue = (depth: number): Json => {
    if (depth > maxDepth) fail(`nesting deeper than ${maxDepth}`);
    skipWhitespace();
    const c = text[pos];
    switch (c) {
      case "{": {
        pos++;
        const object: JsonObject = new Map();
        skipWhitespace();
        if (text[pos] === "}") {
          pos++;
          return object;
        }
        for (;;) {
          skipWhitespace();
          if (text[pos] !== '"') fail("expected a string key");
          const keyAt = pos;
          const key = parseString();
          if (object.has(key)) {
            pos = keyAt;
            fail(`duplicate key ${JSON.stringify(key)}`);
          }
          skipWhitespace();
          if (text[pos] !== ":") fail("expected ':'");
          pos++;
          object.set(key, parseValue(depth + 1));
          skipWhitespace();
          if (text[pos] === ",") {
            pos++;
            continue;
          }
          if (text[pos] === "}") {
            pos++;
            return object;
          }
          fail("expected ',' or '}'");
        }
      }
      case "[": {
        pos++;
        const array: Json[] = [];
        skipWhitespace();
        if (text[pos] === "]") {
          pos++;
          return array;
        }
        for (;;) {
          array.push(parseValue(depth + 1));
          skipWhitespace();
          if (text[pos] === ",") {
            pos++;
            continue;
          }
          if (text[pos] === "]") {
            pos++;
            return array;
          }
          fail("expected ',' or ']'");
        }
      }
      case '"':
        return parseString();
      case "t":
        return expectLiteral("true", true);
      case "f":
        return expectLiteral("false", false);
      case "n":
        return expectLiteral("null", null);
      default:
        if (c === "-" || (c !== undefined && c >= "0" && c <= "9")) return parseNumber();
        return fail(c === undefined ? "unexpected end of input" : "unexpected token");
    }
  };

  const value = parseValue(0);
  skipWhitespace();
  if (pos !== text.length) fail("unexpected data after the JSON value");
  return value;
}
