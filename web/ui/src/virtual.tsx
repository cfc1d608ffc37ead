/**
 * A virtualized list: only the rows in view (plus a margin) are in the DOM, so a table of
 * tens of thousands of rows scrolls as fast as one of fifty.
 */
import { useEffect, useRef, useState } from 'preact/hooks';
import type { ComponentChildren } from 'preact';

/** Height of one row in pixels (style.css uses the same). */
export const ROW_H = 24;

interface Props {
  count: number;
  row: (index: number) => ComponentChildren;
  /** Called when the last rows come into view (to fetch the next page). */
  onEnd?: () => void;
  /** Scroll so this row is visible. */
  scrollTo?: number;
  class?: string;
  testid?: string;
}

export function VirtualList(p: Props) {
  const ref = useRef<HTMLDivElement>(null);
  const [top, setTop] = useState(0);
  const [height, setHeight] = useState(600);

  useEffect(() => {
    const el = ref.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setHeight(el.clientHeight));
    ro.observe(el);
    setHeight(el.clientHeight);
    return () => ro.disconnect();
  }, []);

  useEffect(() => {
    const el = ref.current;
    if (!el || p.scrollTo === undefined || p.scrollTo < 0) return;
    const y = p.scrollTo * ROW_H;
    if (y < el.scrollTop || y + ROW_H > el.scrollTop + el.clientHeight) {
      el.scrollTop = Math.max(0, y - el.clientHeight / 2);
    }
  }, [p.scrollTo]);

  const first = Math.max(0, Math.floor(top / ROW_H) - 10);
  const last = Math.min(p.count, Math.ceil((top + height) / ROW_H) + 10);
  useEffect(() => {
    if (p.onEnd && last >= p.count - 5) p.onEnd();
  }, [last, p.count]);

  const rows = [];
  for (let i = first; i < last; i++) rows.push(p.row(i));
  return (
    <div
      ref={ref}
      class={`vlist ${p.class ?? ''}`}
      data-testid={p.testid}
      onScroll={(e) => setTop((e.currentTarget as HTMLDivElement).scrollTop)}
    >
      <div class="vlist-spacer" style={{ height: `${p.count * ROW_H}px` }}>
        <div class="vlist-rows" style={{ transform: `translateY(${first * ROW_H}px)` }}>
          {rows}
        </div>
      </div>
    </div>
  );
}
