/**
 * How records and packets look in the page: enum names (the CLI's words), the TSV that
 * `interpose conns copy` prints, hex dumps and parsing of the user's hex and text edits.
 * Pure functions only, so the unit tests run them in Node without a browser.
 */

/** A protobuf Timestamp as protobuf-es decodes it. */
export interface Ts {
  seconds: bigint;
  nanos: number;
}

/** Fields of a connection record that the table and the TSV use. */
export interface ConnLike {
  id: bigint;
  node: string;
  srcIp: string;
  srcPort: number;
  dstHost: string;
  dstIp: string;
  dstPort: number;
  status: number;
  closedBy: number;
  closeKind: number;
  reason: string;
  tls: boolean;
  sni: string;
  alpn: string;
  openedAt?: Ts;
  closedAt?: Ts;
  bytesC2s: bigint;
  bytesS2c: bigint;
  packetsC2s: bigint;
  packetsS2c: bigint;
  clientProcess?: { pid: number; name: string };
}

/** `ConnStatus` values by name (the CLI's words), index = enum value. */
export const STATUS_NAMES = ['', 'active', 'disconnected'];
/** `ClosedBy` names. */
export const CLOSED_BY_NAMES = ['', 'client', 'server', 'proxy'];
/** `CloseKind` names. */
export const CLOSE_KIND_NAMES = ['', 'fin', 'rst', 'error'];
/** `Direction` names. */
export const DIRECTION_NAMES = ['', 'c2s', 's2c'];

/** The name of an enum value, or "" when unspecified or unknown to this build. */
export function nameOf(names: string[], v: number): string {
  return names[v] ?? '';
}

/** Milliseconds since the epoch of a Timestamp. */
export function tsMillis(t: Ts): number {
  return Number(t.seconds) * 1000 + Math.floor(t.nanos / 1e6);
}

/** RFC 3339 with microseconds in UTC, exactly as the CLI's `humantime` prints it. */
export function rfc3339Micros(t: Ts | undefined): string {
  if (!t) return '';
  const d = new Date(Number(t.seconds) * 1000);
  const iso = d.toISOString(); // 2024-01-02T03:04:05.000Z
  const micros = String(Math.floor(t.nanos / 1000)).padStart(6, '0');
  return `${iso.slice(0, 19)}.${micros}Z`;
}

/** A time for display, in UTC or the browser's local time zone, to the millisecond. */
export function showTime(t: Ts | undefined, utc: boolean): string {
  if (!t) return '';
  if (utc) return rfc3339Micros(t).replace('T', ' ').slice(0, 23) + 'Z';
  const d = new Date(tsMillis(t));
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return (
    `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`
  );
}

/** The TSV header `interpose conns copy` prints (cli/src/output.rs `TSV_HEADER`). */
export const TSV_HEADER = [
  'id', 'node', 'src_ip', 'src_port', 'dst_host', 'dst_ip', 'dst_port', 'status',
  'closed_by', 'close_kind', 'reason', 'tls', 'sni', 'alpn', 'opened_at', 'closed_at',
  'bytes_c2s', 'bytes_s2c', 'packets_c2s', 'packets_s2c', 'client_process',
].join('\t');

/** One TSV row, as `conn_tsv` in the CLI: tabs and newlines inside fields become spaces. */
export function connTsv(c: ConnLike): string {
  const clean = (s: string) => s.replace(/[\t\n\r]/g, ' ');
  const proc = c.clientProcess ? `${c.clientProcess.name} (${c.clientProcess.pid})` : '';
  return [
    c.id.toString(),
    clean(c.node),
    c.srcIp,
    String(c.srcPort),
    clean(c.dstHost),
    c.dstIp,
    String(c.dstPort),
    nameOf(STATUS_NAMES, c.status),
    nameOf(CLOSED_BY_NAMES, c.closedBy),
    nameOf(CLOSE_KIND_NAMES, c.closeKind),
    clean(c.reason),
    String(c.tls),
    clean(c.sni),
    clean(c.alpn),
    rfc3339Micros(c.openedAt),
    rfc3339Micros(c.closedAt),
    c.bytesC2s.toString(),
    c.bytesS2c.toString(),
    c.packetsC2s.toString(),
    c.packetsS2c.toString(),
    clean(proc),
  ].join('\t');
}

/** The whole clipboard text for some records: the header row, then one row each. */
export function connsTsv(rows: ConnLike[]): string {
  return [TSV_HEADER, ...rows.map(connTsv)].join('\n') + '\n';
}

/** "6 ms", "12.3 s", "4 min 5 s", "2 h 3 min": how long a connection lasted (or has lasted). */
export function duration(ms: number): string {
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.floor(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** Bytes as "1.2 KiB" etc. */
export function bytes(n: bigint): string {
  const v = Number(n);
  if (v < 1024) return `${v} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let x = v / 1024;
  let i = 0;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${x.toFixed(1)} ${units[i]}`;
}

/** A connection's status cell: "active", or "disconnected (server, fin)". */
export function statusText(c: { status: number; closedBy: number; closeKind: number }): string {
  const s = nameOf(STATUS_NAMES, c.status);
  if (c.status !== 2) return s;
  const by = nameOf(CLOSED_BY_NAMES, c.closedBy);
  const kind = nameOf(CLOSE_KIND_NAMES, c.closeKind);
  const how = [by, kind].filter((x) => x).join(', ');
  return how ? `${s} (${how})` : s;
}

/** Lower-case hex, bytes separated by spaces. */
export function toHex(b: Uint8Array): string {
  let out = '';
  for (let i = 0; i < b.length; i++) {
    if (i) out += ' ';
    out += b[i].toString(16).padStart(2, '0');
  }
  return out;
}

/**
 * Bytes from the user's hex: pairs of hex digits, spaces and newlines ignored. Throws an
 * Error whose message names what is wrong.
 */
export function parseHex(s: string): Uint8Array {
  const clean = s.replace(/\s+/g, '');
  if (!/^[0-9a-fA-F]*$/.test(clean)) {
    const bad = clean.match(/[^0-9a-fA-F]/)?.[0] ?? '?';
    throw new Error(`the hex has a character that is not a hex digit: "${bad}"`);
  }
  if (clean.length % 2) throw new Error('the hex has an odd number of digits');
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** UTF-8 text of bytes, or undefined when they are not valid UTF-8 (edit them as hex). */
export function utf8OrUndefined(b: Uint8Array): string | undefined {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(b);
  } catch {
    return undefined;
  }
}

/** Printable ASCII for the text column of a dump; everything else is a dot. */
export function printable(b: Uint8Array): string {
  let s = '';
  for (const c of b) s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '.';
  return s;
}

/** A hex dump: offset, 16 bytes of hex, their printable text; one line each. */
export function hexDump(b: Uint8Array, max = 64 * 1024): string[] {
  const lines: string[] = [];
  const n = Math.min(b.length, max);
  for (let off = 0; off < n; off += 16) {
    const row = b.subarray(off, Math.min(off + 16, n));
    const hex = toHex(row).padEnd(16 * 3 - 1, ' ');
    lines.push(`${off.toString(16).padStart(8, '0')}  ${hex}  ${printable(row)}`);
  }
  if (b.length > max) lines.push(`… ${b.length - max} more bytes not shown`);
  return lines;
}

/**
 * A glob-like pattern for ports and hosts: `*` matches anything, a comma separates
 * alternatives; case-insensitive. An empty pattern matches everything.
 */
export function matchPattern(pattern: string, value: string): boolean {
  const alts = pattern.split(',').map((p) => p.trim()).filter((p) => p);
  if (!alts.length) return true;
  const v = value.toLowerCase();
  return alts.some((p) => {
    const re = new RegExp(
      '^' + p.toLowerCase().split('*').map((x) => x.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*') + '$',
    );
    return re.test(v);
  });
}

/**
 * The decrypted-port mapping the user types, "443:80, 8443:8080", as pairs. Throws an Error
 * naming the bad entry.
 */
export function parsePortMap(s: string): { from: number; to: number }[] {
  const out: { from: number; to: number }[] = [];
  for (const part of s.split(',').map((x) => x.trim()).filter((x) => x)) {
    const m = part.match(/^(\d{1,5})\s*[:=>-]+\s*(\d{1,5})$/);
    const from = m ? Number(m[1]) : 0;
    const to = m ? Number(m[2]) : 0;
    if (!m || from < 1 || from > 65535 || to < 1 || to > 65535) {
      throw new Error(`"${part}" is not a port mapping like 443:80 (ports 1 to 65535)`);
    }
    out.push({ from, to });
  }
  return out;
}

/** Reads `#token=...` from a URL fragment; undefined when there is none. */
export function tokenFromHash(hash: string): string | undefined {
  const h = hash.startsWith('#') ? hash.slice(1) : hash;
  for (const kv of h.split('&')) {
    const [k, v] = kv.split('=');
    if (k === 'token' && v) return decodeURIComponent(v);
  }
  return undefined;
}

/** How a connection was carried: "SOCKS" or "HTTP" (its ingress), then "→ URL" when it went
 * through an upstream proxy. Empty for records from before the ingress was recorded. */
export function via(c: { ingress: string; upstream: string }): string {
  const ingress = c.ingress === 'http' ? 'HTTP' : c.ingress === 'socks5' ? 'SOCKS' : '';
  return c.upstream ? `${ingress} → ${c.upstream}` : ingress;
}
