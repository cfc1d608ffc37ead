/**
 * The page's gRPC-web clients of the Interpose services, generated from proto/ (protobuf-es
 * and connect-web). Every call carries `authorization: Bearer TOKEN`; an UNAUTHENTICATED
 * answer forgets the token and brings back the login form.
 */
import { Code, ConnectError, createClient, type Interceptor } from '@connectrpc/connect';
import { createGrpcWebTransport } from '@connectrpc/connect-web';
import { Registry } from './gen/interpose/registry/v1/registry_pb';
import { Intercept } from './gen/interpose/intercept/v1/intercept_pb';
import { Export } from './gen/interpose/export/v1/export_pb';
import { CertificateAuthority } from './gen/interpose/ca/v1/ca_pb';
import { tokenFromHash } from './format';

/**
 * Where the token lives: sessionStorage, so it is scoped to this tab and this origin, is
 * gone when the tab closes, and is never sent by the browser on its own (no cookie, so no
 * other site can make the browser use it).
 */
const KEY = 'interpose.token';

let token: string | undefined;
const listeners = new Set<() => void>();

/** Takes `#token=` from the address bar, keeps it, and removes it from the URL. */
function takeHashToken(): string | undefined {
  const fromHash = tokenFromHash(window.location.hash);
  if (fromHash) history.replaceState(null, '', window.location.pathname + window.location.search);
  return fromHash;
}

/**
 * Reads the token at start: from the URL `interpose up` printed, else from this tab's
 * storage. A `#token=` pasted into an open tab later (no reload) is taken too.
 */
export function initToken(): void {
  const fromHash = takeHashToken();
  if (fromHash) sessionStorage.setItem(KEY, fromHash);
  token = sessionStorage.getItem(KEY) ?? undefined;
  window.addEventListener('hashchange', () => {
    const t = takeHashToken();
    if (t) setToken(t);
  });
}

/** The token in use, if any. */
export function currentToken(): string | undefined {
  return token;
}

/** Sets (or, with undefined, forgets) the token and tells the app. */
export function setToken(t: string | undefined): void {
  token = t || undefined;
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
  listeners.forEach((l) => l());
}

/** Calls `f` whenever the token changes. */
export function onTokenChange(f: () => void): () => void {
  listeners.add(f);
  return () => listeners.delete(f);
}

const auth: Interceptor = (next) => async (req) => {
  if (token && !req.header.has('authorization')) req.header.set('authorization', `Bearer ${token}`);
  try {
    return await next(req);
  } catch (e) {
    if (e instanceof ConnectError && e.code === Code.Unauthenticated) setToken(undefined);
    throw e;
  }
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [auth],
});

/** The registry: records, the watch, clears and the proxy history. */
export const registry = createClient(Registry, transport);
/** The intercept queue and its configuration. */
export const intercept = createClient(Intercept, transport);
/** PCAP and pcapng export. */
export const exporter = createClient(Export, transport);
/** The proxy's CA certificate. */
export const ca = createClient(CertificateAuthority, transport);

/** A one-sentence message for an error of a call. */
export function errText(e: unknown): string {
  if (e instanceof ConnectError) return `${Code[e.code]}: ${e.rawMessage}`;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** True when an error is a cancellation we asked for (a stream closed by the page). */
export function isCanceled(e: unknown): boolean {
  return e instanceof ConnectError && e.code === Code.Canceled;
}
