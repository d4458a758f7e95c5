package secretfile

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"
)

// Watch reads the secret at path now and then re-reads it whenever it
// changes, until ctx is done or Close is called.
//
// The first read must succeed and yield a non-empty value, or Watch returns
// an error naming the path and the problem. Later a failed or empty re-read
// keeps the last good value and logs a warning; the value itself is never
// logged. If fsnotify cannot be set up (inotify limits, an unsupported
// filesystem) Watch still succeeds and relies on the poll, with a warning.
//
// A nil log discards logs. Call Close to release the watch; cancelling ctx
// stops it too, but Close still has to be called to wait for the goroutine.
func Watch(ctx context.Context, path string, log *zap.Logger, opts ...Option) (*Value, error) {
	v := &Value{}
	v.done = make(chan struct{})
	err := watch(ctx, []string{path}, log, opts, func(vals []string) uint64 {
		v.set(vals[0])
		return v.Version()
	}, &v.stop, v.done)
	if err != nil {
		return nil, err
	}
	return v, nil
}

// watch reads paths, hands the values to publish, and starts one watching
// goroutine that re-reads them all together and hands publish the values
// again whenever one changed; publish returns the new version, for the
// log. stop and done are set up for the caller's Close.
func watch(ctx context.Context, paths []string, log *zap.Logger, opts []Option,
	publish func([]string) uint64, stop *context.CancelFunc, done chan struct{}) error {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	if err := o.validate(); err != nil {
		return err
	}
	if log == nil {
		log = zap.NewNop()
	}
	w := &watcher{opts: o, publish: publish}
	shown := make([]string, len(paths))
	for i, path := range paths {
		if path == "" {
			return errors.New("secretfile: empty path")
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			return fmt.Errorf("secretfile: resolve %s: %w", path, err)
		}
		w.paths = append(w.paths, abs)
		shown[i] = path
	}
	if len(paths) == 1 {
		w.log = log.With(zap.String("path", shown[0]))
	} else {
		w.log = log.With(zap.Strings("paths", shown))
	}
	// Watch before the first read so a change in between is not missed.
	if !o.noFSNotify {
		fw, err := fsnotify.NewWatcher()
		if err != nil {
			w.log.Warn("secret file: cannot watch for changes, polling only",
				zap.Duration("poll_interval", o.poll), zap.Error(err))
		} else {
			w.fs = fw
			w.syncWatches()
		}
	}

	vals, err := w.read()
	if err != nil {
		if w.fs != nil {
			_ = w.fs.Close()
		}
		return err
	}
	w.cur = vals
	publish(vals)

	ctx, *stop = context.WithCancel(ctx)
	go w.run(ctx, done)
	return nil
}

// watcher is the state of one watching goroutine. Only that goroutine
// touches it after Watch returns.
type watcher struct {
	paths   []string
	cur     []string // the values last published
	publish func([]string) uint64
	log     *zap.Logger
	opts    options
	fs      *fsnotify.Watcher // nil when polling only

	// failing is the last re-read error logged as a warning, so a file that
	// stays missing warns once rather than every poll.
	failing string
}

func (w *watcher) run(ctx context.Context, done chan<- struct{}) {
	defer close(done)

	var (
		events <-chan fsnotify.Event
		errs   <-chan error
	)
	if w.fs != nil {
		defer w.fs.Close()
		events, errs = w.fs.Events, w.fs.Errors
	}

	poll := time.NewTicker(w.opts.poll)
	defer poll.Stop()

	// A burst of events (truncate + write, or the several steps of a
	// Kubernetes swap) arms the timer once; one re-read follows the window.
	debounce := time.NewTimer(w.opts.debounce)
	debounce.Stop()
	defer debounce.Stop()
	pending := false
	arm := func() {
		if !pending {
			pending = true
			debounce.Reset(w.opts.debounce)
		}
	}

	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			// Any event in a watched directory may concern the file:
			// Kubernetes changes ..data, not the file's own entry. The
			// content comparison in reload drops the irrelevant ones.
			arm()
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			// An overflow means events were dropped: re-read to be sure.
			w.log.Warn("secret file: watch error", zap.Error(err))
			arm()
		case <-debounce.C:
			pending = false
			w.reload()
		case <-poll.C:
			w.reload()
		}
	}
}

// read reads every path; it fails if any read fails.
func (w *watcher) read() ([]string, error) {
	paths := w.paths
	if len(paths) > 1 {
		paths = resolveTogether(paths)
	}
	vals := make([]string, len(paths))
	for i, p := range paths {
		s, err := readSecret(p)
		if err != nil {
			if p != w.paths[i] { // read through a symlink: name the path given too
				err = fmt.Errorf("%s: %w", w.paths[i], err)
			}
			return nil, err
		}
		vals[i] = s
	}
	return vals, nil
}

// resolveTogether resolves paths through their symlinks, so that files of
// a Kubernetes Secret volume are all read from one generation (its
// ..2024_x directories are never changed, only replaced): reading the
// paths one by one could read one file before a swap and the other after.
// Two resolutions in a row that agree cannot straddle a swap, since a
// generation never comes back. Paths that do not resolve (a missing file)
// are returned as they are, for the read to report.
func resolveTogether(paths []string) []string {
	resolve := func() []string {
		out := make([]string, len(paths))
		for i, p := range paths {
			r, err := filepath.EvalSymlinks(p)
			if err != nil {
				return nil
			}
			out[i] = r
		}
		return out
	}
	prev := resolve()
	for range 3 {
		if prev == nil {
			return paths
		}
		cur := resolve()
		if slices.Equal(prev, cur) {
			return cur
		}
		prev = cur
	}
	return paths
}

// reload re-reads the files and publishes changed values, all of them
// together. A failure keeps the last good values.
func (w *watcher) reload() {
	w.syncWatches()

	vals, err := w.read()
	if err != nil {
		if msg := err.Error(); msg != w.failing {
			w.failing = msg
			w.log.Warn("secret file: re-read failed, keeping last good value", zap.Error(err))
		} else {
			w.log.Debug("secret file: re-read still failing", zap.Error(err))
		}
		return
	}
	if w.failing != "" {
		w.failing = ""
		w.log.Info("secret file: readable again")
	}
	if w.opts.afterRead != nil {
		defer w.opts.afterRead()
	}
	if slices.Equal(vals, w.cur) {
		return
	}
	w.cur = vals
	version := w.publish(vals)
	w.log.Info("secret file: value changed", zap.Uint64("version", version))
	if w.opts.onChange != nil {
		w.opts.onChange()
	}
}

// syncWatches keeps fsnotify watching the directory of the path and, when
// the path resolves through symlinks to another directory, that directory
// too. Watches are lost when a directory is removed; this restores them once
// it exists again, and drops a resolved directory that is no longer used.
func (w *watcher) syncWatches() {
	if w.fs == nil {
		return
	}
	want := w.wantDirs()
	have := w.fs.WatchList()
	for _, d := range have {
		if !slices.Contains(want, d) {
			// The watch may already be gone with its directory.
			_ = w.fs.Remove(d)
		}
	}
	for _, d := range want {
		if slices.Contains(have, d) {
			continue
		}
		if err := w.fs.Add(d); err != nil {
			// The directory may not exist right now; the poll retries.
			w.log.Debug("secret file: cannot watch directory", zap.String("dir", d), zap.Error(err))
		}
	}
}

// wantDirs returns the directories to watch: the parent of each path,
// then the parent of the file it resolves to if that is a different
// directory.
func (w *watcher) wantDirs() []string {
	var dirs []string
	add := func(d string) {
		if !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	for _, path := range w.paths {
		dir := filepath.Dir(path)
		add(dir)
		resolved, err := filepath.EvalSymlinks(path)
		if err != nil {
			continue
		}
		rdir := filepath.Dir(resolved)
		if same, err := filepath.EvalSymlinks(dir); err == nil && same == rdir {
			continue // Same directory under another name; inotify follows it.
		}
		add(rdir)
	}
	return dirs
}
