//! Graphlet-orbit counts (`xattn::graph::orbits`) against a brute-force count: every 2-, 3-
//! and 4-node subset of small seeded random graphs (with self-loops, duplicates and edges given
//! in both directions) matched against the nine graphlets written out as edge lists with each
//! position's orbit; and path, star, cycle and clique graphs with counts worked out by hand.

use rand::{Rng, SeedableRng};
use xattn::graph::orbits::{graphlet_orbits, MAX_SUBGRAPHS, ORBITS};
use xattn::{Error, Graph};

/// A graphlet: its edges over positions 0..k and the orbit of each position (Pržulj's figure).
struct Graphlet {
    edges: &'static [(usize, usize)],
    orbits: &'static [usize],
}

const GRAPHLETS: [Graphlet; 9] = [
    Graphlet {
        edges: &[(0, 1)],
        orbits: &[0, 0],
    },
    Graphlet {
        edges: &[(0, 1), (1, 2)],
        orbits: &[1, 2, 1],
    },
    Graphlet {
        edges: &[(0, 1), (1, 2), (0, 2)],
        orbits: &[3, 3, 3],
    },
    // Path 0-1-2-3.
    Graphlet {
        edges: &[(0, 1), (1, 2), (2, 3)],
        orbits: &[4, 5, 5, 4],
    },
    // Star with centre 0.
    Graphlet {
        edges: &[(0, 1), (0, 2), (0, 3)],
        orbits: &[7, 6, 6, 6],
    },
    // Cycle 0-1-2-3-0.
    Graphlet {
        edges: &[(0, 1), (1, 2), (2, 3), (3, 0)],
        orbits: &[8, 8, 8, 8],
    },
    // Paw: triangle 0 1 2, pendant 3 on 0.
    Graphlet {
        edges: &[(0, 1), (1, 2), (0, 2), (0, 3)],
        orbits: &[11, 10, 10, 9],
    },
    // Diamond: cycle 0-1-2-3-0 with chord 0-2.
    Graphlet {
        edges: &[(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)],
        orbits: &[13, 12, 13, 12],
    },
    Graphlet {
        edges: &[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)],
        orbits: &[14, 14, 14, 14],
    },
];

fn graph(nodes: usize, edges: &[(usize, usize)]) -> Graph {
    let src: Vec<i64> = edges.iter().map(|&(s, _)| s as i64).collect();
    let dst: Vec<i64> = edges.iter().map(|&(_, d)| d as i64).collect();
    Graph::from_coo(nodes, nodes, &src, &dst).unwrap()
}

fn permutations(k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![vec![]];
    }
    let mut all = Vec::new();
    for shorter in permutations(k - 1) {
        for at in 0..k {
            let mut p = shorter.clone();
            p.insert(at, k - 1);
            all.push(p);
        }
    }
    all
}

fn connected(adjacent: &[Vec<bool>], subset: &[usize]) -> bool {
    let mut reached = vec![subset[0]];
    let mut frontier = vec![subset[0]];
    while let Some(a) = frontier.pop() {
        for &b in subset {
            if adjacent[a][b] && !reached.contains(&b) {
                reached.push(b);
                frontier.push(b);
            }
        }
    }
    reached.len() == subset.len()
}

fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    (0u32..1 << n)
        .filter(|mask| mask.count_ones() as usize == k)
        .map(|mask| (0..n).filter(|&i| mask & (1 << i) != 0).collect())
        .collect()
}

/// Orbit counts by trying every subset against every graphlet under every relabelling.
fn brute_force(n: usize, edges: &[(usize, usize)]) -> Vec<[u64; ORBITS]> {
    let mut adjacent = vec![vec![false; n]; n];
    for &(a, b) in edges.iter().filter(|(a, b)| a != b) {
        adjacent[a][b] = true;
        adjacent[b][a] = true;
    }
    let mut counts = vec![[0u64; ORBITS]; n];
    for k in 2..=4 {
        let relabellings = permutations(k);
        for subset in subsets(n, k) {
            let found = GRAPHLETS
                .iter()
                .filter(|g| g.orbits.len() == k)
                .find_map(|g| {
                    relabellings
                        .iter()
                        .find(|p| {
                            (0..k).all(|a| {
                                (a + 1..k).all(|b| {
                                    let edge =
                                        g.edges.contains(&(a, b)) || g.edges.contains(&(b, a));
                                    adjacent[subset[p[a]]][subset[p[b]]] == edge
                                })
                            })
                        })
                        .map(|p| (g, p))
                });
            assert_eq!(found.is_some(), connected(&adjacent, &subset), "{subset:?}");
            if let Some((g, p)) = found {
                for a in 0..k {
                    counts[subset[p[a]]][g.orbits[a]] += 1;
                }
            }
        }
    }
    counts
}

#[test]
fn random_graphs_match_a_brute_force_count() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(26);
    for trial in 0..300 {
        let n = rng.random_range(1..=9);
        let density: f64 = rng.random_range(0.1..0.9);
        let mut edges = Vec::new();
        for a in 0..n {
            for b in 0..n {
                if rng.random_bool(density / 2.0) {
                    edges.push((a, b));
                }
            }
        }
        // Some self-loops and repeats, which count once or not at all.
        for _ in 0..rng.random_range(0..3) {
            let a = rng.random_range(0..n);
            edges.push((a, a));
            if let Some(&(s, d)) = edges.first() {
                edges.push((d, s));
            }
        }
        let expected = brute_force(n, &edges);
        assert_eq!(
            graphlet_orbits(&graph(n, &edges)).unwrap(),
            expected,
            "trial {trial}"
        );
    }
}

fn by_hand(rows: &[&[(usize, u64)]]) -> Vec<[u64; ORBITS]> {
    rows.iter()
        .map(|row| {
            let mut counts = [0; ORBITS];
            for &(orbit, count) in row.iter() {
                counts[orbit] = count;
            }
            counts
        })
        .collect()
}

#[test]
fn path_star_cycle_and_clique_match_counts_by_hand() {
    // Path 0-1-2-3-4. Its 3-paths are 012, 123, 234 (node 2 ends two, middles one); its
    // 4-paths 0123 and 1234 (ends 0, 3 and 1, 4; node 2 is inner in both).
    let path = graph(5, &[(0, 1), (1, 2), (2, 3), (3, 4)]);
    let expected = by_hand(&[
        &[(0, 1), (1, 1), (4, 1)],
        &[(0, 2), (1, 1), (2, 1), (4, 1), (5, 1)],
        &[(0, 2), (1, 2), (2, 1), (5, 2)],
        &[(0, 2), (1, 1), (2, 1), (4, 1), (5, 1)],
        &[(0, 1), (1, 1), (4, 1)],
    ]);
    assert_eq!(graphlet_orbits(&path).unwrap(), expected);

    // Star: centre 0, leaves 1..=4. The centre is the middle of C(4, 2) = 6 3-paths and the
    // centre of C(4, 3) = 4 claws; a leaf ends 3 of the 3-paths and is a leaf of C(3, 2) = 3
    // claws.
    let star = graph(5, &[(0, 1), (0, 2), (3, 0), (4, 0)]);
    let leaf: &[(usize, u64)] = &[(0, 1), (1, 3), (6, 3)];
    let expected = by_hand(&[&[(0, 4), (2, 6), (7, 4)], leaf, leaf, leaf, leaf]);
    assert_eq!(graphlet_orbits(&star).unwrap(), expected);

    // 5-cycle: the 3-paths and 4-paths are its 5 runs of 3 and of 4 consecutive nodes (a run's
    // ends are not adjacent); a node ends 2 and is inside 1 run of 3, ends 2 and is inside 2
    // runs of 4.
    let cycle = graph(5, &[(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]);
    let node: &[(usize, u64)] = &[(0, 2), (1, 2), (2, 1), (4, 2), (5, 2)];
    assert_eq!(graphlet_orbits(&cycle).unwrap(), by_hand(&[node; 5]));

    // 5-clique: every 3- and 4-subset is complete; a node is in C(4, 2) = 6 triangles and
    // C(4, 3) = 4 4-cliques. Each edge given in both directions and twice, plus self-loops.
    let mut edges: Vec<(usize, usize)> = (0..5).flat_map(|a| (0..5).map(move |b| (a, b))).collect();
    edges.extend_from_within(..);
    let node: &[(usize, u64)] = &[(0, 4), (3, 6), (14, 4)];
    assert_eq!(
        graphlet_orbits(&graph(5, &edges)).unwrap(),
        by_hand(&[node; 5])
    );
}

#[test]
fn hubs_over_the_limit_and_two_node_sets_are_refused() {
    // A star of degree 3,000 has C(3000, 3) ≈ 4.5·10⁹ claws, over the limit.
    let hub: Vec<(usize, usize)> = (1..=3000).map(|leaf| (0, leaf)).collect();
    match graphlet_orbits(&graph(3001, &hub)) {
        Err(Error::Argument(message)) => {
            assert!(message.contains(&MAX_SUBGRAPHS.to_string()), "{message}")
        }
        other => panic!("expected the limit, got {other:?}"),
    }
    let bipartite = Graph::from_coo(3, 2, &[0, 2], &[1, 0]).unwrap();
    assert!(matches!(
        graphlet_orbits(&bipartite),
        Err(Error::Argument(_))
    ));
}
