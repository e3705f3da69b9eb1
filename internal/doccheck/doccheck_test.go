package doccheck

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// root is the repository, from this package's directory.
const root = "../.."

// source holds what the code of the repository says: its string literals
// and the metric names it registers.
type source struct {
	literals []string
	metrics  map[string]bool
}

// readSource parses every non-test Go file of the repository (but the
// pinned tools).
func readSource(t *testing.T) source {
	t.Helper()
	src := source{metrics: map[string]bool{}}
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "tools" || d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.BasicLit:
				if n.Kind == token.STRING {
					if s, err := strconv.Unquote(n.Value); err == nil {
						src.literals = append(src.literals, s)
					}
				}
			case *ast.CompositeLit:
				// prometheus.CounterOpts{Namespace: namespace, Subsystem: "x", Name: "y"}
				var sub, name string
				for _, e := range n.Elts {
					kv, ok := e.(*ast.KeyValueExpr)
					if !ok {
						continue
					}
					key, _ := kv.Key.(*ast.Ident)
					lit, _ := kv.Value.(*ast.BasicLit)
					if key == nil || lit == nil {
						continue
					}
					v, _ := strconv.Unquote(lit.Value)
					switch key.Name {
					case "Subsystem":
						sub = v
					case "Name":
						name = v
					}
				}
				if sub != "" && name != "" {
					src.metrics["overlay_"+sub+"_"+name] = true
				}
			case *ast.CallExpr:
				// m.GaugeFunc("x", "y", ...) and m.CounterFunc("x", "y", ...)
				sel, ok := n.Fun.(*ast.SelectorExpr)
				if !ok || (sel.Sel.Name != "GaugeFunc" && sel.Sel.Name != "CounterFunc") || len(n.Args) < 2 {
					return true
				}
				sub, ok1 := n.Args[0].(*ast.BasicLit)
				name, ok2 := n.Args[1].(*ast.BasicLit)
				if ok1 && ok2 {
					s, _ := strconv.Unquote(sub.Value)
					m, _ := strconv.Unquote(name.Value)
					src.metrics["overlay_"+s+"_"+m] = true
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(src.metrics) == 0 || len(src.literals) == 0 {
		t.Fatal("found no metric or no string literal in the code: the parser missed it")
	}
	return src
}

// hasMessage reports whether msg is a literal, or two literals joined.
func (s source) hasMessage(msg string) bool {
	if msg == "" {
		return false
	}
	for _, l := range s.literals {
		if l == msg {
			return true
		}
		if rest, ok := strings.CutPrefix(msg, l); ok && l != "" && slices.Contains(s.literals, rest) {
			return true
		}
	}
	return false
}

// docs returns the text of README.md and every file of docs/, by name.
func docs(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	paths, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	paths = append(paths, filepath.Join(root, "README.md"))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(p)] = string(b)
	}
	if len(out) < 5 {
		t.Fatalf("found only %d documents", len(out))
	}
	return out
}

var (
	msgRE    = regexp.MustCompile(`msg=(?:"((?:[^"\\]|\\.)*)"|([^\s"` + "`" + `|,)]+))`)
	metricRE = regexp.MustCompile(`\boverlay_[a-z0-9_]*[a-z0-9]`)
)

// TestQuotedLogMessagesExist: every msg="..." in the docs is a message
// the code logs.
func TestQuotedLogMessagesExist(t *testing.T) {
	src := readSource(t)
	n := 0
	for name, text := range docs(t) {
		for _, m := range msgRE.FindAllStringSubmatch(text, -1) {
			msg := m[2]
			if m[1] != "" {
				var err error
				if msg, err = strconv.Unquote(`"` + m[1] + `"`); err != nil {
					t.Errorf("%s: cannot read %s: %v", name, m[0], err)
					continue
				}
			}
			n++
			if !src.hasMessage(msg) {
				t.Errorf("%s quotes a log message the code does not write: %s", name, m[0])
			}
		}
	}
	if n < 20 {
		t.Errorf("found only %d quoted log messages in the docs: is the msg= convention still used?", n)
	}
}

// TestMetricNamesExist: every overlay_ metric the docs name is one the
// code registers, and docs/metrics.md lists every one it registers.
func TestMetricNamesExist(t *testing.T) {
	src := readSource(t)
	suffixes := []string{"_bucket", "_sum", "_count"}
	for name, text := range docs(t) {
		for _, m := range metricRE.FindAllString(text, -1) {
			ok := src.metrics[m]
			for _, suf := range suffixes {
				ok = ok || src.metrics[strings.TrimSuffix(m, suf)]
			}
			if !ok {
				t.Errorf("%s names a metric the code does not register: %s", name, m)
			}
		}
	}
	table := docs(t)["metrics.md"]
	for m := range src.metrics {
		if !strings.Contains(table, "| `"+m+"` |") {
			t.Errorf("docs/metrics.md has no row for %s", m)
		}
	}
}
