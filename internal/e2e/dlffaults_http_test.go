package e2e

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

func (r *dlffRig) readyz(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.httpAddr+"/readyz", nil)
	if err != nil {
		return 0, err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// dlffMetrics is the worker's dlf_stop_dlf_calls_total by code.
type dlffMetrics map[string]float64

func (m dlffMetrics) total() float64 {
	var n float64
	for _, v := range m {
		n += v
	}
	return n
}

func (m dlffMetrics) calls() string {
	return joinSorted(m, ",", func(k string, v float64) string { return fmt.Sprintf("%s:%g", k, v) })
}

// joinSorted renders a map's entries in key order, for report lines.
func joinSorted[V any](m map[string]V, sep string, entry func(string, V) string) string {
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, entry(k, m[k]))
	}
	return strings.Join(parts, sep)
}

// metrics reads dlf_stop_dlf_calls_total from the worker's /metrics.
func (r *dlffRig) metrics() (dlffMetrics, error) {
	req, err := http.NewRequestWithContext(r.ctx, http.MethodGet, "http://"+r.httpAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := dlffMetrics{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), `dlf_stop_dlf_calls_total{code="`)
		if !ok {
			continue
		}
		code, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", sc.Text(), err)
		}
		m[code] = v
	}
	return m, sc.Err()
}

// readySample is one /readyz answer (0: no answer).
type readySample struct {
	at   time.Time
	code int
}

// readyzPoll samples /readyz on a ticker until stopped.
type readyzPoll struct {
	mu      sync.Mutex
	samples []readySample
	cancel  context.CancelFunc
	done    chan struct{}
}

func (r *dlffRig) pollReadyz(every time.Duration) *readyzPoll {
	ctx, cancel := context.WithCancel(r.ctx)
	p := &readyzPoll{cancel: cancel, done: make(chan struct{})}
	r.t.Cleanup(p.stop)
	go func() {
		defer close(p.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			code, _ := r.readyz(ctx)
			if ctx.Err() != nil {
				return
			}
			p.mu.Lock()
			p.samples = append(p.samples, readySample{at: time.Now(), code: code})
			p.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return p
}

func (p *readyzPoll) stop() { p.cancel(); <-p.done }

type readyStats struct {
	samples, notReady  int // within the fault window; notReady counts 503s
	unanswered         int // within the window: no answer or a code other than 200 and 503
	readyAfterNotReady int // 200s within the window after the first non-200
	firstNotReady      time.Time
	longest            time.Duration // longest non-200 stretch from the window's start on
}

// stats looks at the samples from `from` on; counts are for [from, to).
func (p *readyzPoll) stats(from, to time.Time) readyStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	var s readyStats
	var runStart time.Time
	var last time.Time
	for _, x := range p.samples {
		if x.at.Before(from) {
			continue
		}
		last = x.at
		inWindow := x.at.Before(to)
		if inWindow && x.code != http.StatusOK && x.code != http.StatusServiceUnavailable {
			s.unanswered++ // a dead or hung worker must not pass for a paused one
		}
		if x.code != http.StatusOK {
			if inWindow && x.code == http.StatusServiceUnavailable {
				s.notReady++
				if s.firstNotReady.IsZero() {
					s.firstNotReady = x.at
				}
			}
			if runStart.IsZero() {
				runStart = x.at
			}
		} else {
			if inWindow && !s.firstNotReady.IsZero() {
				s.readyAfterNotReady++
			}
			if !runStart.IsZero() {
				s.longest = max(s.longest, x.at.Sub(runStart))
				runStart = time.Time{}
			}
		}
		if inWindow {
			s.samples++
		}
	}
	if !runStart.IsZero() {
		s.longest = max(s.longest, last.Sub(runStart))
	}
	return s
}
