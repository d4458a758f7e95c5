package secretfile

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// layout creates the initial file holding value under dir and returns the
// path to watch and a function that replaces the value.
type layout func(t *testing.T, dir, value string) (path string, change func(value string))

// inPlace truncates and rewrites the file.
func inPlace(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) { writeFile(t, path, v+"\n") }
}

// renameOver writes a temporary file and renames it over the path.
func renameOver(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) {
		tmp := filepath.Join(dir, ".sk.tmp")
		writeFile(t, tmp, v+"\r\n")
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
}

// kubernetes mimics the kubelet's atomic writer:
// dir/..2024_x/sk, dir/..data -> ..2024_x, dir/sk -> ..data/sk.
func kubernetes(t *testing.T, dir, value string) (string, func(string)) {
	return kubernetesSwap(t, dir, value, true)
}

// kubernetesKeepOld swaps ..data but leaves the old generation in place, so
// the file the path used to resolve to never changes: only the directory
// watch sees the swap.
func kubernetesKeepOld(t *testing.T, dir, value string) (string, func(string)) {
	return kubernetesSwap(t, dir, value, false)
}

func kubernetesSwap(t *testing.T, dir, value string, removeOld bool) (string, func(string)) {
	swap := kubeVolume(t, dir, map[string]string{"sk": value})
	return filepath.Join(dir, "sk"), func(v string) { swap(map[string]string{"sk": v}, removeOld) }
}

// kubeVolume lays out a Secret volume the way the kubelet does, with one
// file per key (value plus a newline): dir/..2024_x/<key>, dir/..data ->
// ..2024_x, dir/<key> -> ..data/<key>. swap writes a new generation with
// every key and points ..data at it in one rename; removeOld then removes
// the old generation, as the kubelet does.
func kubeVolume(t *testing.T, dir string, files map[string]string) (swap func(files map[string]string, removeOld bool)) {
	t.Helper()
	newGeneration := func(files map[string]string) string {
		gen, err := os.MkdirTemp(dir, "..2024_")
		if err != nil {
			t.Fatal(err)
		}
		for name, v := range files {
			writeFile(t, filepath.Join(gen, name), v+"\n")
		}
		return filepath.Base(gen)
	}
	data := filepath.Join(dir, "..data")
	if err := os.Symlink(newGeneration(files), data); err != nil {
		t.Fatal(err)
	}
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return func(files map[string]string, removeOld bool) {
		old, err := os.Readlink(data)
		if err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(newGeneration(files), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, data); err != nil {
			t.Fatal(err)
		}
		if !removeOld {
			return
		}
		if err := os.RemoveAll(filepath.Join(dir, old)); err != nil {
			t.Fatal(err)
		}
	}
}

// symlinkElsewhere watches a symlink to a file in another directory that is
// rewritten in place there.
func symlinkElsewhere(t *testing.T, dir, value string) (string, func(string)) {
	for _, d := range []string{"real", "mount"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	real := filepath.Join(dir, "real", "secret")
	writeFile(t, real, value+"\n")
	path := filepath.Join(dir, "mount", "sk")
	if err := os.Symlink(real, path); err != nil {
		t.Fatal(err)
	}
	return path, func(v string) { writeFile(t, real, v+"\n") }
}

// removeRecreate removes the file and creates it again at once (a watcher
// may or may not see it missing; TestRemovedFileKeepsLastGoodValue covers
// a file that stays gone).
func removeRecreate(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		writeFile(t, path, v+"\n")
	}
}

func TestWatchFollowsChanges(t *testing.T) {
	layouts := []struct {
		name   string
		layout layout
	}{
		{"in-place rewrite", inPlace},
		{"atomic rename-over", renameOver},
		{"kubernetes symlink swap", kubernetes},
		{"kubernetes symlink swap keeping old generation", kubernetesKeepOld},
		{"symlink to another directory", symlinkElsewhere},
		{"removed then re-created", removeRecreate},
	}
	for _, m := range modes {
		for _, l := range layouts {
			t.Run(m.name+"/"+l.name, func(t *testing.T) {
				secrets := []string{"sk-one-7f3a9c", "sk-two-b81e44", "sk-three-0d5c2f"}
				path, change := l.layout(t, t.TempDir(), secrets[0])
				h := start(t, path, secrets, m.opts...)
				h.assert(secrets[0], 1)

				change(secrets[1])
				h.waitChanges(1)
				h.assert(secrets[1], 2)

				// A second change proves the watch survived the first
				// (for Kubernetes, the old generation directory is gone).
				change(secrets[2])
				h.waitChanges(2)
				h.assert(secrets[2], 3)
			})
		}
	}
}

func TestRemovedFileKeepsLastGoodValue(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			secrets := []string{"tok-alpha-55e1", "tok-beta-93ab"}
			path := filepath.Join(t.TempDir(), "token")
			writeFile(t, path, secrets[0])
			h := start(t, path, secrets, m.opts...)

			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			h.waitWarning("no such file or directory")
			h.assert(secrets[0], 1)

			writeFile(t, path, secrets[1])
			h.waitChanges(1)
			h.assert(secrets[1], 2)
			waitFor(t, "a recovery log", func() bool {
				return h.logs.FilterMessage("secret file: readable again").Len() > 0
			})
		})
	}
}

func TestDirectoryRemovedAndRecreated(t *testing.T) {
	// The directory watch dies with the directory; the poll still converges
	// and restores the watch.
	dir := filepath.Join(t.TempDir(), "secrets")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sk")
	writeFile(t, path, "dir-old-4242")
	h := start(t, path, []string{"dir-old-4242", "dir-new-9191", "dir-newer-7373"},
		WithPollInterval(20*time.Millisecond))

	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	h.waitWarning("no such file or directory")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, "dir-new-9191")
	h.waitChanges(1)
	h.assert("dir-new-9191", 2)

	writeFile(t, path, "dir-newer-7373")
	h.waitChanges(2)
	h.assert("dir-newer-7373", 3)
}

func TestEmptyRewriteKeepsLastGoodValue(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			secrets := []string{"pw-first-c0ffee", "pw-second-decaf0"}
			path := filepath.Join(t.TempDir(), "password")
			writeFile(t, path, secrets[0]+"\n")
			h := start(t, path, secrets, m.opts...)

			writeFile(t, path, " \r\n\n")
			h.waitWarning(ErrEmpty.Error())
			h.assert(secrets[0], 1)
			if n := h.changes.Load(); n != 0 {
				t.Errorf("OnChange called %d times for an empty file", n)
			}

			writeFile(t, path, secrets[1]+"\n")
			h.waitChanges(1)
			h.assert(secrets[1], 2)
		})
	}
}

func TestUnchangedContentIsNotAChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "same-value\n")
	var reads atomic.Int64
	h := start(t, path, []string{"same-value"}, withoutFSNotify(), WithPollInterval(time.Millisecond), withReadCount(&reads))

	// Rewrite with the same content but a different trailing newline, and
	// wait until it has been read (the second read from now started after
	// the write): it is not a change. Then the real change is.
	writeFile(t, path, "same-value\r\n")
	from := reads.Load()
	waitFor(t, "two re-reads of the rewritten file", func() bool { return reads.Load() >= from+2 })
	h.assert("same-value", 1)
	if n := h.changes.Load(); n != 0 {
		t.Errorf("OnChange called %d times for content that did not change", n)
	}
	writeFile(t, path, "other-value")
	h.waitChanges(1)
	h.assert("other-value", 2)
}

func TestConcurrentGetDuringRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "v-0")
	h := start(t, path, nil, withoutFSNotify(), WithPollInterval(time.Millisecond))

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if s := h.v.Get(); !strings.HasPrefix(s, "v-") {
					t.Errorf("Get() = %q mid-rotation", s)
					return
				}
			}
		})
	}
	for i := 1; i <= 5; i++ {
		tmp := path + ".tmp"
		writeFile(t, tmp, fmt.Sprintf("v-%d", i))
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("v-%d", i)
		waitFor(t, want, func() bool { return h.v.Get() == want })
	}
	cancel()
	wg.Wait()
	if got := h.v.Version(); got != 6 {
		t.Errorf("Version() = %d after 5 rotations, want 6", got)
	}
}
